from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from lightning_score.models import (
    build_clip,
    build_zero_shot_head,
    guess_template_set,
    list_template_sets,
    load_templates,
)

CLASSES = ["cat", "dog", "big bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "itap of my {}."]


def _reference_head(model: torch.nn.Module, tokenizer, classnames, templates) -> torch.Tensor:
    """The protocol, written out in float64: normalise each prompt, average, normalise, scale."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            emb = model.encode_text(tokenizer([t.format(name) for t in templates])).double()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows) * model.logit_scale.exp().double()


def test_head_follows_the_protocol_and_is_frozen_and_bias_free(tmp_path: Path) -> None:
    clip = build_clip("tiny-ViT-W64-L2")
    head = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    expected = _reference_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES)
    torch.testing.assert_close(head.weight.double(), expected, atol=1e-5, rtol=1e-5)
    assert list(head.parameters()) == [] and list(head.state_dict()) == ["weight"]
    features = torch.nn.functional.normalize(torch.randn(5, head.weight.shape[1]), dim=-1)
    torch.testing.assert_close(head(features), features @ head.weight.T)
    torch.testing.assert_close(head(torch.zeros_like(features)), torch.zeros(5, 3))  # no bias
    assert head.classnames == CLASSES and head.templates == TEMPLATES


def test_head_cache_skips_encoding_and_is_keyed_by_text_weights_classes_and_templates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = build_clip("tiny-ViT-W64-L2")
    first = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    calls = []
    real_encode = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    with torch.no_grad():  # the image encoder does not enter the key
        clip.model.visual.conv1.weight.add_(1.0)
    second = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert calls == [] and torch.equal(first.weight, second.weight)

    build_zero_shot_head(clip.model, clip.tokenizer, CLASSES[:2], TEMPLATES, cache_dir=tmp_path)
    build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES[:1], cache_dir=tmp_path)
    with torch.no_grad():
        clip.model.token_embedding.weight.mul_(1.5)
    changed = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not torch.equal(changed.weight, first.weight)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped byte", "no digest"])
def test_a_damaged_cached_head_is_recomputed_with_a_warning_naming_it(tmp_path: Path, damage: str) -> None:
    """A cut-off or altered cache file is never used, never fatal: the head is recomputed and the file rewritten."""
    from safetensors.torch import load_file, save_file

    clip = build_clip("tiny-ViT-W64-L2")
    fresh = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped byte":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:])  # a bit of the last weight
    else:  # a file of an earlier release: no digest in its header
        save_file(load_file(str(path)), str(path))
    with pytest.warns(UserWarning, match="cached zero-shot head") as caught:
        again = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert str(path) in str(caught[0].message) and "recomputing it" in str(caught[0].message)
    assert torch.equal(again.weight, fresh.weight)
    with warnings.catch_warnings():  # the rewritten file is good: read back without a word
        warnings.simplefilter("error")
        third = build_zero_shot_head(clip.model, clip.tokenizer, CLASSES, TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(third.weight, fresh.weight)


def test_imagenet_set_is_the_clip_papers_80_templates() -> None:
    templates = load_templates("imagenet")
    assert len(templates) == 80
    assert templates == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def test_every_shipped_set_loads_with_one_placeholder_per_template() -> None:
    names = list_template_sets()
    assert {"imagenet", "pacs", "digits", "medical_retina", "medical_skin"} <= set(names)
    for name in names:
        templates = load_templates(name)
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert load_templates("digits")[0].format("seven") == "a photo of the digit seven."


def test_custom_json_set_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"templates": ["an x-ray of {}."]}))
    assert load_templates(str(good)) == ["an x-ray of {}."]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": ["no placeholder"]}))
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(str(bad))
    with pytest.raises(ValueError, match="imagenet"):
        load_templates("no-such-set")


def test_auto_templates_are_guessed_from_domain_names() -> None:
    assert guess_template_set(["art_painting", "cartoon", "photo", "sketch"]) == "pacs"
    assert guess_template_set(["Art", "Clipart", "Real World"]) == "imagenet"  # OfficeHome: the authors' 80 prompts
    assert guess_template_set(["aptos2019", "messidor2"]) == "retina"  # the RetinaDomains preset's own set
    assert guess_template_set(["APTOS2019", "idrid"]) == "retina"  # case and the preset's aliases
    assert guess_template_set(["rot0", "rot75"]) == "digits"
    assert guess_template_set(["photo"]) is None
    assert guess_template_set(["a", "b"]) is None


def _pacs_like(root: Path) -> Path:
    from tests.data.generate import domainbed

    return domainbed(root, {d: {"dog": 3, "horse": 3} for d in ("art_painting", "cartoon", "photo", "sketch")})


@pytest.mark.parametrize(("templates", "warned"), [("pacs_domains", True), ("auto", False), ("pacs", False)])
def test_a_template_set_naming_a_held_out_domain_is_flagged_unless_it_is_the_datasets_own(
    templates: str, warned: bool, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """PACS's own set ("a photo of a {}.") names its photo domain on purpose; another set that does is flagged."""
    import lightning as L

    from lightning_score import DomainDataModule
    from lightning_score.classifier import CLIPClassifier

    data = DomainDataModule(str(_pacs_like(tmp_path / "pacs")), train_domains=["cartoon", "sketch"],
                            test_domains=["photo", "art_painting"], num_workers=0)  # fmt: skip
    assert data.default_templates == "pacs"
    module = CLIPClassifier("tiny-ViT-W64-L2", None, templates=templates, head_cache=False)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1).test(
        module, datamodule=data, verbose=False
    )
    flagged = [str(w.message) for w in recwarn if "names the held-out domain" in str(w.message)]
    if not warned:
        assert not flagged and module.template_set in ("pacs",)
        return
    assert len(flagged) == 1, flagged
    message = flagged[0]
    assert "Template set 'pacs_domains' names the held-out domain(s) ['art_painting', 'photo']" in message
    assert "e.g. 'a photo of a {}.' (photo)" in message
    assert "templates='auto' gives the authors' set for a known dataset" in message
