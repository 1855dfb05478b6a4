"""The image tower's state dict converted between open_clip, transformers and timm computes the same features.

Every tower is a tiny random one built in code (no download); every parameter is perturbed so that a swapped
LayerNorm, a transposed projection or q/k/v in the wrong order changes the features.
"""

from __future__ import annotations

import sys

import open_clip
import pytest
import torch
from torch import nn

from lightning_score.models.convert import BACKBONES, convert_state_dict
from lightning_score.models.tower_configs import hf_vision_config, timm_vit_kwargs

transformers = pytest.importorskip("transformers")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

ATOL = 1e-5


def _perturb(module: nn.Module, seed: int, keep_zero: tuple[str, ...] = ()) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name not in keep_zero:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _open_clip_tower(seed: int = 0, quick_gelu: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-ViT-W64-L2", force_quick_gelu=quick_gelu)
    return _perturb(model.visual, seed)


def _build(backbone: str, template: nn.Module) -> nn.Module:
    """A random model of ``backbone`` with the tiny tower's network."""
    if backbone == "hf":
        return transformers.CLIPVisionModelWithProjection(hf_vision_config(template)).eval()
    return timm_vit.VisionTransformer(**timm_vit_kwargs(template)).eval()


def _features(backbone: str, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if backbone == "hf":
            return model(pixel_values=images).image_embeds
        return model(images)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quick_gelu", [False, True])
@pytest.mark.parametrize("target", ["hf", "timm"])
def test_open_clip_tower_converted_computes_the_same_features(target: str, quick_gelu: bool, images) -> None:
    tower = _open_clip_tower(quick_gelu=quick_gelu)
    other = _build(target, tower)
    state = convert_state_dict(tower.state_dict(), "open_clip", target)
    other.load_state_dict(state, strict=True)
    expected = _features("open_clip", tower, images)
    assert expected.abs().max() > 0.1  # features of substance, not a degenerate tower
    torch.testing.assert_close(_features(target, other, images), expected, atol=ATOL, rtol=0)
    back = convert_state_dict(state, target, "open_clip")
    assert list(back) == list(tower.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tower.state_dict().items())  # the round trip is exact


@pytest.mark.parametrize("source", ["hf", "timm"])
def test_a_library_tower_converted_to_open_clip_computes_the_same_features(source: str, images) -> None:
    template = _open_clip_tower(seed=5)
    model = _perturb(_build(source, template), seed=7, keep_zero=("head.bias",))  # open_clip's proj has no bias
    tower = _open_clip_tower(seed=8)
    tower.load_state_dict(convert_state_dict(model.state_dict(), source, "open_clip"), strict=True)
    torch.testing.assert_close(
        _features("open_clip", tower, images), _features(source, model, images), atol=ATOL, rtol=0
    )
    again = convert_state_dict(convert_state_dict(model.state_dict(), source, "open_clip"), "open_clip", source)
    assert set(again) == set(model.state_dict())
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_hf_and_timm_convert_into_each_other(images) -> None:
    template = _open_clip_tower(seed=2)
    hf = _perturb(_build("hf", template), seed=3)
    timm = _build("timm", template)
    timm.load_state_dict(convert_state_dict(hf.state_dict(), "hf", "timm"), strict=True)
    torch.testing.assert_close(_features("timm", timm, images), _features("hf", hf, images), atol=ATOL, rtol=0)


def test_the_image_keys_of_a_whole_hf_clip_model_convert(images) -> None:
    tower = _open_clip_tower(seed=4)
    config = transformers.CLIPConfig(
        vision_config=hf_vision_config(tower).to_dict(),
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=tower.proj.shape[1],
    )
    clip = _perturb(transformers.CLIPModel(config), seed=6)
    image_keys = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    image_keys["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # older checkpoints hold this buffer
    tower.load_state_dict(convert_state_dict(image_keys, "hf", "open_clip"), strict=True)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=images)
    expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(_features("open_clip", tower, images), expected, atol=ATOL, rtol=0)


def test_a_task_vector_of_some_keys_converts_key_by_key() -> None:
    fused = torch.arange(12.0).reshape(6, 2)
    hf = convert_state_dict({"transformer.resblocks.1.attn.in_proj_weight": fused, "proj": fused}, "open_clip", "hf")
    assert sorted(hf) == [
        "vision_model.encoder.layers.1.self_attn.k_proj.weight",
        "vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "vision_model.encoder.layers.1.self_attn.v_proj.weight",
        "visual_projection.weight",
    ]
    assert torch.equal(hf["vision_model.encoder.layers.1.self_attn.k_proj.weight"], fused[2:4])
    assert torch.equal(hf["visual_projection.weight"], fused.T)
    timm = convert_state_dict({"positional_embedding": fused, "class_embedding": fused[0]}, "open_clip", "timm")
    assert timm["pos_embed"].shape == (1, 6, 2) and timm["cls_token"].shape == (1, 1, 2)
    assert timm["pos_embed"].dtype == fused.dtype


def test_conversions_refuse_what_they_cannot_convert_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"'transformer\.resblocks\.0\.ls_1\.gamma' is no key"):
        convert_state_dict({"transformer.resblocks.0.ls_1.gamma": torch.ones(2)}, "open_clip", "hf")
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.q_norm\.weight' is no key .*timm"):
        convert_state_dict({"blocks.0.attn.q_norm.weight": torch.ones(2)}, "timm", "open_clip")
    q_only = {"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}
    with pytest.raises(ValueError, match=r"'transformer\.resblocks\.0\.attn\.in_proj_weight' together with .*k_proj"):
        convert_state_dict(q_only, "hf", "open_clip")
    head = {"head.weight": torch.ones(3, 2), "head.bias": torch.tensor([0.0, 0.5, 0.0])}
    with pytest.raises(ValueError, match=r"'head\.bias' is not zero"):
        convert_state_dict(head, "timm", "open_clip")
    with pytest.raises(ValueError, match=r"Unknown backbone 'keras'.*'hf', 'open_clip', 'timm'"):
        convert_state_dict({}, "open_clip", "keras")
    assert sorted(BACKBONES) == ["hf", "open_clip", "timm"]


def test_a_tower_with_layer_scale_has_no_hf_or_timm_twin() -> None:
    tower = open_clip.create_model("tiny-ViT-W64-L2", pretrained=None).visual
    tower.transformer.resblocks[0].ls_1 = nn.Linear(64, 64)  # no longer the plain CLIP ViT
    with pytest.raises(ValueError, match="not a plain CLIP ViT"):
        hf_vision_config(tower)
    with pytest.raises(ValueError, match="not a plain CLIP ViT"):
        timm_vit_kwargs(tower)


def test_without_transformers_the_hf_config_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    tower = open_clip.create_model("tiny-ViT-W64-L2").visual
    monkeypatch.setitem(sys.modules, "transformers", None)  # as on an install without the hf extra
    with pytest.raises(ImportError, match=r"^transformers is not installed: .*pip install 'lightning-score\[hf\]'$"):
        hf_vision_config(tower)
