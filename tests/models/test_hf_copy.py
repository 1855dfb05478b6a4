"""An open_clip CLIP written as a transformers CLIPModel folder computes the same features and tokens, offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import lightning_score.models as models
from lightning_score.data.digits import DIGIT_NAMES
from lightning_score.models.hf_copy import hf_clip_from_open_clip, save_hf_copy, write_clip_tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights moved off their initial values, so no norm is the identity and no bias is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _features(output: object) -> torch.Tensor:
    """transformers 4 returns the projected features, transformers 5 an output whose pooler_output they are."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _prompts() -> list[str]:
    digits = [t.format(c) for c in (*DIGIT_NAMES, *map(str, range(10))) for t in models.load_templates("digits")]
    imagenet = [t.format(c) for c in DIGIT_NAMES[:3] for t in models.load_templates("imagenet")[:5]]
    return [*digits, *imagenet, "a photo of " + "very " * 40 + "long prompt, truncated at the context length."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[models.CLIPComponents, Path]:
    clip = models.build_clip("tiny-ViT-W64-L2")
    _perturbed(clip.model)
    folder = save_hf_copy(clip.model, tmp_path_factory.mktemp("hf") / "copy", tokenizer=clip.tokenizer)
    return clip, folder


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_folder_holds_model_tokenizer_and_preprocessor(saved, offline) -> None:
    _, folder = saved
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"} <= names
    assert {"tokenizer_config.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_text_features_and_tokens_equal_open_clip(saved, offline) -> None:
    clip, folder = saved
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = _prompts()
    ours = clip.tokenizer(prompts)
    theirs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    eot = clip.tokenizer.eot_token_id
    for prompt, a, b in zip(prompts, ours.tolist(), theirs["input_ids"].tolist(), strict=True):
        end = a.index(eot) + 1
        assert b[:end] == a[:end], prompt
    assert ours[-1, -1] == eot  # the long prompt was truncated (its end-of-text at the context length)
    with torch.no_grad():
        expected = clip.model.encode_text(ours)
        got = _features(hf.get_text_features(**theirs))
    assert expected.abs().min() > 0 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_image_features_and_logit_scale_equal_open_clip(saved, offline) -> None:
    clip, folder = saved
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = clip.model.encode_image(images)
        got = _features(hf.get_image_features(pixel_values=images))
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert float(hf.logit_scale.detach()) == pytest.approx(float(clip.model.logit_scale.detach()), abs=1e-7)


def test_the_weights_are_exact_copies() -> None:
    model = _perturbed(models.build_clip("tiny-ViT-W64-L2").model, seed=2)
    hf = hf_clip_from_open_clip(model)
    assert not hf.training
    state = hf.state_dict()
    assert torch.equal(state["text_projection.weight"], model.text_projection.T)
    for name, part in zip("qkv", model.transformer.resblocks[1].attn.in_proj_weight.chunk(3), strict=True):
        assert torch.equal(state[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"], part)
    assert torch.equal(state["text_model.final_layer_norm.bias"], model.ln_final.bias)
    assert torch.equal(state["visual_projection.weight"], model.visual.proj.T)
    assert hf.config.text_config.eos_token_id == 49407 and hf.config.text_config.max_position_embeddings == 32


def test_the_preprocessor_is_open_clips(saved, offline) -> None:
    clip, folder = saved
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    cfg = clip.model.visual.preprocess_cfg
    assert processor.size == {"shortest_edge": 32} and processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx(list(cfg["mean"]), abs=1e-8)
    assert processor.image_std == pytest.approx(list(cfg["std"]), abs=1e-8)
    assert int(processor.resample) == 3 and processor.do_center_crop  # bicubic, centre crop
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], clip.val_transform(image), atol=TOL, rtol=0)


def test_the_default_tokenizer_is_open_clips(tmp_path: Path, offline) -> None:
    folder = write_clip_tokenizer(tmp_path / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    prompt = "a photo of the digit 7, it's a handwritten one!"
    expected = open_clip.tokenizer.SimpleTokenizer()([prompt])[0]
    ids = tokenizer(prompt)["input_ids"]
    assert ids == expected[: len(ids)].tolist() and ids[-1] == 49407 and tokenizer.model_max_length == 77


def test_other_text_towers_are_refused_by_name(tmp_path: Path) -> None:
    model = models.build_clip("tiny-ViT-W64-L2").model
    model.attn_mask = None
    with pytest.raises(ValueError, match="no causal attention mask"):
        save_hf_copy(model, tmp_path / "a")
    model = models.build_clip("tiny-ViT-W64-L2").model
    model.text_pool_type = "last"
    with pytest.raises(ValueError, match="text pooling 'last'"):
        save_hf_copy(model, tmp_path / "b")
    custom = open_clip.create_model("tiny-ViT-W64-L2", force_custom_text=True)
    with pytest.raises(ValueError, match="no built-in open_clip text transformer"):
        save_hf_copy(custom, tmp_path / "c")
    with pytest.raises(ValueError, match="_clean_canonicalize"):
        write_clip_tokenizer(tmp_path / "d", open_clip.tokenizer.SimpleTokenizer(clean="canonicalize"))
    with pytest.raises(ValueError, match=r"context length \(49407, 77\)"):  # the model has 32 positions
        save_hf_copy(
            models.build_clip("tiny-ViT-W64-L2").model, tmp_path / "e", tokenizer=open_clip.get_tokenizer("ViT-B-32")
        )
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path: Path) -> None:
    clip = models.build_clip("tiny-ViT-W64-L2")
    target = tmp_path / "copy"
    target.mkdir()
    (target / "other.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf_copy(clip.model, target, tokenizer=clip.tokenizer)
    assert (target / "other.txt").read_text() == "kept"
    save_hf_copy(clip.model, target, tokenizer=clip.tokenizer, overwrite=True)
    assert (target / "model.safetensors").is_file() and not (target / "other.txt").exists()
