"""Every backbone through fit → callback → merge → test → export: transformers and timm copies of the quick base.

The hf base is an exact ``save_pretrained`` copy of the quick open_clip base (``save_hf_copy``), the timm base a
weights file of its image tower with the open_clip text tower for the head. The open_clip experts, converted to
each library's keys, must merge to the same model (the papers' matrix convention on every backbone), test the
same per image, and export a folder that the library alone loads to the same logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from lightning_score import CLIPExpert, MergeModule, ScoreMergeCallback, TaskVector
from lightning_score.cli import ScoreTrainer
from lightning_score.models import build_clip
from lightning_score.models.convert import convert_state_dict
from lightning_score.models.hf_copy import save_hf_copy
from lightning_score.models.tower_configs import timm_vit_kwargs
from lightning_score.task_vector import state_dict_fingerprint
from tests.experts import MODEL, QUIET, digits
from tests.processes import in_fresh_process, run_script

pytest.importorskip("transformers")
pytest.importorskip("timm")

SOURCES = ["rot0", "rot30"]
TARGET = "rot60"
TIMM_ARCH = "vit_base_patch32_clip_224"


@pytest.fixture(scope="module")
def bases(quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """backbone -> MergeModule/CLIPExpert keyword arguments of the quick base in that library."""
    folder = tmp_path_factory.mktemp("bases")
    clip = build_clip(MODEL, str(quick_base)).model
    hf = save_hf_copy(clip, folder / "hf")
    kwargs = timm_vit_kwargs(clip.visual)
    args = {k: kwargs[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")}
    timm_state = convert_state_dict(clip.visual.state_dict(), "open_clip", "timm")
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(folder / "timm.safetensors"))
    text = {"backbone": "open_clip", "model_name": MODEL, "pretrained": str(quick_base)}
    return {
        "open_clip": {"model_name": MODEL, "pretrained": str(quick_base)},
        "hf": {"model_name": str(hf), "pretrained": "openai", "backbone": "hf"},
        "timm": {
            "model_name": TIMM_ARCH,
            "pretrained": str(folder / "timm.safetensors"),
            "backbone": "timm",
            "backbone_options": {"model_args": {**args, "mlp_ratio": kwargs["mlp_ratio"]}, "text": text},
        },
    }


def _encoder_state(base: dict) -> dict[str, torch.Tensor]:
    module = MergeModule(**base, mode="zeroshot", templates="digits")
    return module.image_encoder.state_dict()


@pytest.fixture(scope="module")
def converted(
    bases: dict[str, dict], expert_task_vectors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[str]]:
    """backbone -> the open_clip experts of SOURCES in its keys, recorded as made from its base."""
    out: dict[str, list[str]] = {"open_clip": [str(expert_task_vectors[d]) for d in SOURCES]}
    for backbone in ("hf", "timm"):
        paths = [expert_task_vectors[d] for d in SOURCES]
        out[backbone] = _converted(paths, bases[backbone], tmp_path_factory.mktemp(f"tv-{backbone}"))
    return out


def _converted(paths: list[Path], base: dict, folder: Path) -> list[str]:
    """Open_clip task-vector files in ``base``'s backbone's keys, recorded as made from its base (same names)."""
    backbone, fingerprint = base["backbone"], state_dict_fingerprint(_encoder_state(base))
    out = []
    for path in paths:
        tv = TaskVector.load(path)
        tensors = convert_state_dict(dict(tv.items()), "open_clip", backbone)
        out.append(str(TaskVector(tensors, {**tv.metadata, "base_fingerprint": fingerprint}).save(folder / path.name)))
    return out


def _tested(base: dict, task_vectors: list[str], **kwargs: object) -> tuple[MergeModule, torch.Tensor]:
    """The module after a test run, and its logits on the target's first 64 test images (:func:`_images`)."""
    module = MergeModule(**base, task_vectors=task_vectors, templates="digits", **kwargs)
    data = digits(train_domains=SOURCES, test_domains=[TARGET])
    L.Trainer(accelerator="cpu", devices=1, **QUIET).test(module, datamodule=data, verbose=False)
    with torch.no_grad():
        return module, module(_images(data))


def _images(data: object) -> torch.Tensor:
    return next(iter(data.test_dataloader()[0]))[0][:64]  # type: ignore[attr-defined]


_OPEN_CLIP: dict[tuple, tuple[MergeModule, torch.Tensor]] = {}


def _open_clip_logits(bases: dict, converted: dict, **kwargs: str) -> tuple[MergeModule, torch.Tensor]:
    """:func:`_tested` of the open_clip experts, computed once per merge for both libraries' comparisons."""
    key = tuple(sorted(kwargs.items()))
    if key not in _OPEN_CLIP:
        _OPEN_CLIP[key] = _tested(bases["open_clip"], converted["open_clip"], **kwargs)
    return _OPEN_CLIP[key]


@pytest.mark.parametrize("backbone", ["hf", "timm"])
@pytest.mark.parametrize("method", ["score", "tsv", "iso_c", "task_arithmetic"])
def test_the_same_experts_merge_to_the_same_model_in_every_library(
    bases: dict[str, dict], converted: dict[str, list[str]], backbone: str, method: str
) -> None:
    _, reference = _open_clip_logits(bases, converted, method=method)
    _, logits = _tested(bases[backbone], converted[backbone], method=method)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_qkv_split_is_fusionbench_s_merge_on_every_library_and_another_model(
    bases: dict[str, dict], converted: dict[str, list[str]], backbone: str
) -> None:
    _, fused = _tested(bases[backbone], converted[backbone], method="tsv")
    _, split = _tested(bases[backbone], converted[backbone], method="tsv", qkv="split")
    _, open_clip_split = _open_clip_logits(bases, converted, method="tsv", qkv="split")
    torch.testing.assert_close(split, open_clip_split, rtol=0, atol=1e-4)
    assert (split - fused).abs().max() > 1e-3  # another merge, not a relabelling


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_a_fit_on_each_library_writes_its_own_keys_and_the_open_clip_fit_s_update(
    bases: dict[str, dict], tmp_path: Path, backbone: str
) -> None:
    taus = {}
    for name in ("open_clip", backbone):
        expert = CLIPExpert(**bases[name], templates="digits", lr=1e-3, warmup_steps=2)
        L.seed_everything(3, verbose=False)  # after the build: each library's constructor draws random numbers
        callback = ScoreMergeCallback(dirpath=tmp_path / name)
        trainer = L.Trainer(max_steps=4, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback], **QUIET)
        trainer.fit(expert, datamodule=digits(train_domains=["rot15"]))
        tv = TaskVector.load(callback.task_vector_path)
        assert set(tv) <= set(expert.image_encoder.state_dict())  # the library's own keys
        assert tv.base_fingerprint == expert.pretrained_fingerprint
        taus[name] = (
            dict(tv.items()) if name == "open_clip" else convert_state_dict(dict(tv.items()), name, "open_clip")
        )
    assert set(taus[backbone]) == set(taus["open_clip"])
    worst = 0.0
    for key, tau in taus["open_clip"].items():  # 4 AdamW steps from the same weights, seed and batches
        theirs = taus[backbone][key]
        if key.endswith("attn.in_proj_bias"):  # the key bias: its gradient is 0 up to rounding (softmax ignores
            d = tau.shape[0] // 3  # a constant per query), which AdamW scales up to full steps: noise, not learned
            tau, theirs = torch.cat([tau[:d], tau[2 * d :]]), torch.cat([theirs[:d], theirs[2 * d :]])
        worst = max(worst, float((theirs - tau).norm() / tau.norm().clamp_min(1e-12)))
    assert worst < 1e-4, worst


CHILD = r"""
import sys
sys.modules["lightning_score"] = None
import json
from pathlib import Path
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
folder, backbone, images, out = Path(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3]), sys.argv[4]
card = json.loads((folder / "lightning_score_card.json").read_text())
if backbone == "open_clip":
    import open_clip
    features = open_clip.create_model("local-dir:" + str(folder)).eval().encode_image(images)
elif backbone == "hf":
    import transformers
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    features = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
else:
    import timm
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    features = model(images)
head = load_file(str(folder / "zero_shot_head.safetensors"))["weight"]
torch.save({"logits": F.normalize(features, dim=-1) @ head.T, "card": card}, out)
"""


@pytest.mark.parametrize("backbone", ["open_clip", "hf", "timm"])
def test_an_export_loads_with_its_library_alone_to_the_merged_module_s_logits(
    bases: dict[str, dict], converted: dict[str, list[str]], tmp_path: Path, backbone: str
) -> None:
    module, logits = _tested(bases[backbone], converted[backbone], method="score", alpha=0.8)
    folder = module.export(tmp_path / "export", test_accuracies={TARGET: 0.5})
    data = digits(train_domains=SOURCES, test_domains=[TARGET])
    data.train_transform, data.val_transform = module.train_transform, module.val_transform
    data.setup("test")
    torch.save(_images(data), tmp_path / "images.pt")
    args = [str(folder), backbone, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")]
    subprocess.run([sys.executable, "-c", CHILD, *args], check=True, cwd=tmp_path, timeout=300)
    result = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-4)
    card = result["card"]
    assert (card["backbone"], card["method"], card["alpha"]) == (backbone, "score", 0.8)
    assert card["test_accuracies"] == {TARGET: 0.5}
    assert [e["path"] for e in card["experts"]] == converted[backbone]  # the files merged, in every library


def test_merge_exports_a_transformers_model_with_the_test_accuracies_on_its_card(
    bases: dict[str, dict], converted: dict[str, list[str]], tmp_path: Path
) -> None:
    trainer = ScoreTrainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, **QUIET)
    module = MergeModule(**bases["hf"], task_vectors=converted["hf"], method="tsv", templates="digits")
    results = trainer.merge(module, datamodule=digits(train_domains=SOURCES, test_domains=[TARGET]))
    folder = tmp_path / "merged" / "tsv"  # the hf default: an export, no open_clip weights file
    assert trainer.merged_path == folder and not (tmp_path / "merged" / "tsv.safetensors").exists()
    card = json.loads((folder / "lightning_score_card.json").read_text())
    assert card["test_accuracies"] == {TARGET: pytest.approx(results[f"test/{TARGET}/acc"])}
    with pytest.raises(ValueError, match="--export FOLDER"):
        trainer.merge(module, datamodule=digits(train_domains=SOURCES, test_domains=[TARGET]), output="x.safetensors")


def test_a_timm_head_file_gives_the_text_tower_s_head(
    bases: dict[str, dict], converted: dict[str, list[str]], tmp_path: Path
) -> None:
    module, logits = _tested(bases["timm"], converted["timm"], method="average")
    folder = module.export(tmp_path / "export")
    options = {**bases["timm"]["backbone_options"], "head": str(folder / "zero_shot_head.safetensors")}
    del options["text"]
    _, from_file = _tested({**bases["timm"], "backbone_options": options}, converted["timm"], method="average")
    torch.testing.assert_close(from_file, logits, rtol=0, atol=1e-5)
    options["head"] = str(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        MergeModule(**{**bases["timm"], "backbone_options": options}, mode="zeroshot")


@pytest.mark.ddp
def test_fsdp2_shards_each_library_s_blocks_and_tests_as_one_process(
    bases: dict[str, dict],
    expert_task_vectors: dict[str, Path],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """2 gloo CPU processes, the real ModelParallelStrategy (not GPUs, not NCCL); the experts of rot0 and rot60."""
    from tests.merge_module.sharded_backbones import single_process
    from tests.merge_module.test_sharded import _in_order

    runs = {}
    for backbone in ("hf", "timm"):
        (tmp_path / backbone).mkdir()
        paths = [expert_task_vectors[d] for d in ("rot0", "rot60")]  # sharded_merge.datamodule's sources
        runs[backbone] = {
            "base": bases[backbone],
            "task_vectors": _converted(paths, bases[backbone], tmp_path / backbone),
        }
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    run_script(Path(__file__).parent / "sharded_backbones.py", str(tmp_path), str(tmp_path / "runs.json"), timeout=420)
    for backbone, run in runs.items():
        ranks = [torch.load(tmp_path / f"{backbone}-rank{rank}.pt") for rank in (0, 1)]
        assert all(rank["sharded"] for rank in ranks), backbone  # each rank held a shard while the test ran
        reference = in_fresh_process(single_process, run)
        logits = _in_order([rank["logits"] for rank in ranks], len(reference))
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_open_clip_experts_are_refused_by_another_library_s_base_naming_the_key(
    bases: dict[str, dict], converted: dict[str, list[str]], backbone: str
) -> None:
    module = MergeModule(**bases[backbone], task_vectors=converted["open_clip"], method="tsv", templates="digits")
    data = digits(train_domains=SOURCES, test_domains=[TARGET])
    with pytest.raises(ValueError, match="is of a different architecture than .*its key 'class_embedding' is not in"):
        L.Trainer(accelerator="cpu", devices=1, **QUIET).test(module, datamodule=data, verbose=False)
    assert module.merged is None


@pytest.mark.parametrize("backbone", ["hf", "timm"])
def test_a_bf16_true_fit_and_merge_on_each_library(bases: dict[str, dict], tmp_path: Path, backbone: str) -> None:
    expert = CLIPExpert(**bases[backbone], templates="digits", lr=1e-3, warmup_steps=2)
    callback = ScoreMergeCallback(dirpath=tmp_path)
    trainer = L.Trainer(max_steps=3, precision="bf16-true", num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[callback], **QUIET)  # fmt: skip
    trainer.fit(expert, datamodule=digits(train_domains=["rot15"]))
    tv = TaskVector.load(callback.task_vector_path)
    assert set(tv) <= set(expert.image_encoder.state_dict()) and tv.base_fingerprint == expert.pretrained_fingerprint
    assert all(torch.isfinite(tv[key]).all() for key in tv) and any(tv[key].abs().sum() > 0 for key in tv)
    module = MergeModule(**bases[backbone], task_vectors=[str(callback.task_vector_path)], mode="expert",
                         templates="digits")  # fmt: skip
    data = digits(train_domains=["rot15"], test_domains=[TARGET])
    results = L.Trainer(accelerator="cpu", devices=1, precision="bf16-true", **QUIET).test(module, datamodule=data,
                                                                                             verbose=False)  # fmt: skip
    assert 0.0 <= results[0][f"test/{TARGET}/acc"] <= 1.0
    assert next(module.image_encoder.parameters()).dtype == torch.bfloat16  # tested in bf16, as the Trainer runs
