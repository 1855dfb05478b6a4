"""The backbone interface: names, options, the built-in copies, and one clear error for what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_score import CLIPExpert, MergeModule
from lightning_score.merge_module.matrices import check_convention, from_matrices, to_matrices
from lightning_score.models.backbones import BACKBONE_TYPES, get_backbone
from lightning_score.models.conventions import from_matrix_convention
from lightning_score.models.zero_shot import fixed_zero_shot_head
from lightning_score.task_vector import TaskVector

pytest.importorskip("transformers")
pytest.importorskip("timm")

TINY = "tiny-ViT-W64-L2"


def test_the_registry_names_each_backbone_and_refuses_another() -> None:
    assert {name: cls().name for name, cls in BACKBONE_TYPES.items()} == {n: n for n in ("open_clip", "hf", "timm")}
    with pytest.raises(ValueError, match=r"Unknown backbone 'jax': use one of \['hf', 'open_clip', 'timm'\]"):
        get_backbone("jax")
    with pytest.raises(ValueError, match=r"\['model_args'\] are not options of backbone 'open_clip': it takes none"):
        get_backbone("open_clip").check_options({"model_args": {}})
    with pytest.raises(ValueError, match=r"\['size'\] are not options of backbone 'timm'"):
        get_backbone("timm").check_options({"size": 3})


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_a_builtin_copy_computes_the_open_clip_base_s_features(backbone: str, quick_builtin: str) -> None:
    reference = get_backbone("open_clip").build(quick_builtin, "builtin:digits", {})
    copy = get_backbone(backbone).build(quick_builtin, "builtin:digits", {})
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of the digit 3.", "a rotated 7."]
    with torch.no_grad():
        torch.testing.assert_close(copy.model.visual(images), reference.model.visual(images), rtol=0, atol=1e-5)
        text = copy.model.encode_text(copy.tokenizer(prompts))
        torch.testing.assert_close(text, reference.model.encode_text(reference.tokenizer(prompts)), rtol=0, atol=1e-5)
    assert float(copy.model.logit_scale) == float(reference.model.logit_scale)
    assert copy.base_model == f"{backbone}:{quick_builtin}/builtin:digits"
    assert str(copy.val_transform) == str(reference.val_transform)  # the protocol's preprocessing, the same numbers


def test_what_a_backbone_cannot_do_is_refused_before_anything_is_built(tmp_path: Path, quick_builtin: str) -> None:
    with pytest.raises(ValueError, match="lora=...\\) fine-tunes open_clip models only, not backbone 'hf'"):
        CLIPExpert(TINY, "builtin:digits", backbone="hf", lora={"rank": 4})
    with pytest.raises(ValueError, match="ESM merges open_clip experts only, not the 'timm' backbone's"):
        MergeModule(TINY, "builtin:digits", task_vectors=["a.safetensors"], method="esm", backbone="timm")
    with pytest.raises(ValueError, match="qkv='split' applies to the data-free methods; 'regmean'"):
        MergeModule(TINY, "builtin:digits", task_vectors=["a.safetensors"], method="regmean", qkv="split")
    with pytest.raises(ValueError, match="qkv='joint'"):
        check_convention("tsv", False, "hf", "joint")
    with pytest.raises(ValueError, match="exactly one of backbone_options.text .* got neither"):
        get_backbone("timm").build("vit_base_patch32_clip_224", None, {})
    with pytest.raises(FileNotFoundError, match="is not a save_pretrained folder .*config.json"):
        get_backbone("hf").build(str(tmp_path), "openai", {})
    with pytest.raises(FileNotFoundError, match="weights file '.*missing.safetensors' does not exist"):
        text = {"model_name": quick_builtin, "pretrained": "builtin:digits"}
        get_backbone("timm").build("vit_base_patch32_clip_224", str(tmp_path / "missing.safetensors"), {"text": text})


def test_a_fixed_head_must_be_of_the_datamodule_s_classes() -> None:
    weight = torch.eye(3)
    assert fixed_zero_shot_head((weight, None), ["a", "b", "c"]).classnames == ["a", "b", "c"]
    with pytest.raises(ValueError, match="has 3 rows but the datamodule has 2 classes"):
        fixed_zero_shot_head((weight, None), ["a", "b"])
    with pytest.raises(ValueError, match="names and their order must agree"):
        fixed_zero_shot_head((weight, ["a", "c", "b"]), ["a", "b", "c"])


def _hf_tv(seed: int, exempt: bool = False) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    keys = [f"vision_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    tensors = {k: torch.randn(4, 4, generator=g) for k in keys}
    tensors["visual_projection.weight"] = torch.randn(2, 4, generator=g)
    merge = {"merge": {"alpha_exempt_keys": ["vision_model.encoder.layers.0.self_attn.qkv_proj.weight"]}}
    return TaskVector(tensors, merge if exempt else {})


def test_the_matrix_convention_round_trips_and_renames_the_keys_exempt_from_alpha() -> None:
    tvs = [_hf_tv(0), _hf_tv(1)]
    fused = to_matrices(tvs, "hf", "fused")
    assert sorted(fused[0]) == ["vision_model.encoder.layers.0.self_attn.qkv_proj.weight", "visual_projection.weight"]
    assert tuple(fused[0]["visual_projection.weight"].shape) == (4, 2)  # open_clip's proj [d, e]
    back = from_matrices(TaskVector(dict(fused[0].items()), _hf_tv(0, exempt=True).metadata), "hf", "fused")
    for key, tensor in tvs[0].items():
        assert torch.equal(back[key], tensor)
    assert back.metadata["merge"]["alpha_exempt_keys"] == sorted(
        f"vision_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    )
    same = [TaskVector({"conv1.weight": torch.ones(2, 2)})]
    assert to_matrices(same, "open_clip", "fused")[0] is same[0]  # open_clip, fused: the inputs as they are
    assert set(from_matrix_convention({"pos_embed": torch.zeros(3, 2)}, "timm")) == {"pos_embed"}


@pytest.mark.parametrize("backbone", ["open_clip", "hf", "timm"])
def test_gradient_checkpointing_recomputes_each_library_s_tower_to_the_same_gradients(
    backbone: str, quick_builtin: str
) -> None:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    grads = []
    for checkpointing in (False, True):
        expert = CLIPExpert(quick_builtin, "builtin:digits", backbone=backbone, classnames=[str(i) for i in range(10)],
                            gradient_checkpointing=checkpointing, head_cache=False).train()  # fmt: skip
        torch.nn.functional.cross_entropy(expert(images), labels).backward()
        grads.append({k: p.grad for k, p in expert.image_encoder.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-7)
    if backbone == "hf":
        assert expert.clip.library_model.is_gradient_checkpointing
    else:
        assert (
            getattr(expert.image_encoder, "grad_checkpointing", None)
            or expert.image_encoder.transformer.grad_checkpointing
        )
