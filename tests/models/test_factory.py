from __future__ import annotations

import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import lightning_score.models as models
from lightning_score.models import build_clip, read_weights_metadata, save_clip_weights


def _outputs(clip: models.CLIPComponents) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    tokens = clip.tokenizer(["a photo of the digit seven.", "a handwritten digit two."])
    with torch.no_grad():
        return clip.model.encode_image(images), clip.model.encode_text(tokens)


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_tiny_models_are_registered_and_build_in_seconds(name: str) -> None:
    assert name in open_clip.list_models()
    start = time.perf_counter()
    clip = build_clip(name)
    assert time.perf_counter() - start < 10
    assert isinstance(clip.model, open_clip.CLIP)
    assert clip.base_model == f"{name}/random" and clip.weights is None
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    assert clip.val_transform(image).shape == (3, 32, 32)
    assert clip.train_transform(image).shape == (3, 32, 32)
    image_features, text_features = _outputs(clip)
    assert image_features.shape == (4, embed_dim) and text_features.shape == (2, embed_dim)
    assert clip.tokenizer(["a photo"]).shape == (1, 32)


def test_safetensors_weights_written_by_the_project_load_back_to_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    original = build_clip("tiny-ViT-W64-L2")
    path = save_clip_weights(original.model, tmp_path / "w.safetensors", model_name="tiny-ViT-W64-L2")
    assert read_weights_metadata(path)["model_name"] == "tiny-ViT-W64-L2"
    assert not list(tmp_path.glob(".*tmp")), "the temporary file of the atomic write is left behind"

    torch.manual_seed(2)  # a different random init, which the file must fully overwrite
    loaded = build_clip("tiny-ViT-W64-L2", pretrained=path)
    assert loaded.base_model == "tiny-ViT-W64-L2/w.safetensors" and loaded.weights == str(path)
    before, after = original.model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for a, b in zip(_outputs(original), _outputs(loaded), strict=True):
        assert torch.equal(a, b)


def test_plain_pt_state_dict_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    original = build_clip("tiny-ViT-W64-L2")
    torch.save(original.model.state_dict(), tmp_path / "w.pt")
    loaded = build_clip("tiny-ViT-W64-L2", pretrained=str(tmp_path / "w.pt"))
    for a, b in zip(_outputs(original), _outputs(loaded), strict=True):
        assert torch.equal(a, b)


class _Payload:
    """Stands for arbitrary pickled code in a checkpoint."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    clip = build_clip("tiny-ViT-W64-L2")
    torch.save({"state_dict": clip.model.state_dict(), "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="unpickling"):
        build_clip("tiny-ViT-W64-L2", pretrained=tmp_path / "evil.pt")


def test_weights_of_another_architecture_are_rejected_with_the_right_name(tmp_path: Path) -> None:
    small = build_clip("tiny-ViT-W64-L2")
    save_clip_weights(small.model, tmp_path / "small.safetensors", model_name="tiny-ViT-W64-L2")
    with pytest.raises(ValueError, match="written for model 'tiny-ViT-W64-L2'"):
        build_clip("tiny-ViT-W96-L3", pretrained=tmp_path / "small.safetensors")
    torch.save(small.model.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit open_clip model 'tiny-ViT-W96-L3'"):
        build_clip("tiny-ViT-W96-L3", pretrained=tmp_path / "small.pt")


def test_bad_names_and_paths_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_clip("tiny-ViT-W64-L2", pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="'openai'"):
        build_clip("ViT-B-32", pretrained="not-a-tag")
    with pytest.raises(ValueError, match="tiny-ViT-W96-L3"):
        build_clip("ViT-Nonexistent-1", pretrained=None)
    with pytest.raises(ValueError, match="builtin:digits"):
        build_clip("tiny-ViT-W64-L2", pretrained="builtin:nothing")


def test_tag_that_cannot_download_fails_fast_and_explains_local_files(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported; an empty cache_dir has nothing.
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"pass its path instead: pretrained='/path/to/"):
        build_clip("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_builtin_digits_token_resolves_to_the_cached_base_file(quick_base: Path, quick_builtin: str) -> None:
    name = quick_builtin
    builtin = build_clip(name, pretrained="builtin:digits")
    assert builtin.weights == str(quick_base)
    assert builtin.base_model == f"{name}/builtin:digits"
    direct = build_clip(name, pretrained=quick_base)
    for a, b in zip(_outputs(builtin), _outputs(direct), strict=True):
        assert torch.equal(a, b)


def test_quick_gelu_survives_a_weights_file(tmp_path) -> None:
    """OpenAI's weights run with QuickGELU; a merged model saved from them must load back as the same network."""
    import open_clip
    import torch

    from lightning_score.models import build_clip, save_clip_weights
    from lightning_score.models.factory import uses_quick_gelu

    model = open_clip.create_model("tiny-ViT-W64-L2", force_quick_gelu=True).eval()
    assert uses_quick_gelu(model)
    path = save_clip_weights(model, tmp_path / "quick.safetensors", model_name="tiny-ViT-W64-L2")
    loaded = build_clip("tiny-ViT-W64-L2", str(path)).model
    assert uses_quick_gelu(loaded)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    plain = save_clip_weights(
        open_clip.create_model("tiny-ViT-W64-L2"), tmp_path / "plain.safetensors", model_name="tiny-ViT-W64-L2"
    )
    assert not uses_quick_gelu(build_clip("tiny-ViT-W64-L2", str(plain)).model)
