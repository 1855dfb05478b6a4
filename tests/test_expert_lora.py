"""LoRA experts (``CLIPExpert(lora=...)``): only the adapters train; the task vector is merge_and_unload() minus θ₀,
under the keys of a full fine-tune; a checkpoint saves and resumes them; the command line takes the settings."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_score import CLIPExpert, ScoreMergeCallback, TaskVector
from lightning_score.models.lora import LoraSettings
from tests.experts import MODEL, QUIET, digits
from tests.processes import worker_environment

peft = pytest.importorskip("peft")


def _lora_expert(base: Path, **lora: object) -> CLIPExpert:
    return CLIPExpert(MODEL, str(base), templates="digits", lr=1e-2, warmup_steps=1, lora={"rank": 4, **lora})


def _float_keys(module: torch.nn.Module) -> list[str]:
    return sorted(key for key, value in module.state_dict().items() if value.is_floating_point())


def merge_and_unload_update(expert: CLIPExpert, base: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the expert's adapters into a fresh base tower, minus the base: the reference update."""
    pretrained = CLIPExpert(MODEL, str(base)).image_encoder
    settings = expert.lora
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.rank if settings.alpha is None else settings.alpha,
                             target_modules=list(settings.targets), use_rslora=settings.use_rslora)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(pretrained), config)
    adapters = {f"base_model.model.{k}": v for k, v in expert.image_encoder.state_dict().items() if ".lora_" in k}
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    merged = model.merge_and_unload().state_dict()
    return {key: merged[key].double() - value.double() for key, value in pretrained.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A rank-4 LoRA expert fitted 8 steps on rot45, with its task vector and the clip weights before fit."""
    folder = tmp_path_factory.mktemp("lora-expert")
    expert = _lora_expert(quick_base)
    before = {k: v.clone() for k, v in expert.clip.state_dict().items()}
    callback = ScoreMergeCallback(dirpath=folder)
    trainer = L.Trainer(max_steps=8, limit_val_batches=0, callbacks=[callback], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(expert, datamodule=digits(train_domains=["rot45"]))
    assert not [w for w in caught if "no longer holds the pre-trained" in str(w.message)]  # θ₀ is the base, exactly
    return {"expert": expert, "trainer": trainer, "before": before, "tv": TaskVector.load(callback.task_vector_path)}


def test_only_the_adapters_train_and_change(fitted: dict) -> None:
    expert, before = fitted["expert"], fitted["before"]
    after = expert.clip.state_dict()
    adapters = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert adapters and adapters == {
        f"visual.{n}" for n, p in expert.image_encoder.named_parameters() if p.requires_grad
    }
    assert set(after) - adapters == set(before) - adapters  # the base weights are still there, under base_layer
    changed = {k: (after[k] - before[k]).abs().max().item() for k in after
               if k not in adapters and not torch.equal(before[k], after[k])}  # fmt: skip
    # nothing else changes, but PEFT's MultiheadAttention adds its update to the frozen weights for each forward and
    # subtracts it again afterwards, which rounds: those weights move by a few ulps (nothing trains them)
    assert sorted(changed) == sorted(
        f"visual.transformer.resblocks.{i}.attn.base_layer.{weight}"
        for i in (0, 1)
        for weight in ("in_proj_weight", "out_proj.base_layer.weight")
    )
    assert max(changed.values()) < 1e-6, changed
    assert all(not torch.equal(before[k], after[k]) for k in adapters if ".lora_B." in k)  # B left zero: it trained
    optimised = {id(p) for group in fitted["trainer"].optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in expert.image_encoder.parameters() if p.requires_grad}
    assert expert.hparams.lora == LoraSettings(rank=4).record()  # plain values in hparams (and checkpoints)


def test_the_task_vector_has_a_full_experts_keys_and_is_merge_and_unloads_update(
    fitted: dict, quick_base: Path
) -> None:
    tv = fitted["tv"]
    assert sorted(tv) == _float_keys(CLIPExpert(MODEL, str(quick_base)).image_encoder)  # a full fine-tune's keys
    expected = merge_and_unload_update(fitted["expert"], quick_base)
    assert sorted(expected) == sorted(tv)
    for key in tv:
        torch.testing.assert_close(tv[key].double(), expected[key], rtol=0, atol=1e-6, msg=key)
    adapted = [k for k in tv if k.endswith(("attn.in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"))]
    assert len(adapted) == 4 * 2 and all(tv[k].abs().max() > 0 for k in adapted)  # 2 blocks × 4 weights
    assert all(not tv[k].any() for k in tv if k not in adapted)  # the rest of the tower is frozen
    assert tv.metadata["adapters"]["adapters"]["default"]["r"] == [4]


def test_a_lora_expert_saves_and_resumes_from_a_checkpoint(quick_base: Path, tmp_path: Path) -> None:
    first = _lora_expert(quick_base, alpha=8)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[
        ScoreMergeCallback(dirpath=tmp_path / "tvs")], **{**QUIET, "enable_checkpointing": True})  # fmt: skip
    trainer.fit(first, datamodule=digits(train_domains=["rot45"]))
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    at_four = {k: v.clone() for k, v in TaskVector.load(tmp_path / "tvs" / "rot45.safetensors").items()}

    loaded = CLIPExpert.load_from_checkpoint(checkpoint)  # the LoRA layers rebuilt from hparams, then the weights
    assert loaded.lora == LoraSettings(rank=4, alpha=8)
    images = torch.randn(3, 3, 32, 32)
    first.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), first(images), rtol=0, atol=0)

    resumed = _lora_expert(quick_base, alpha=8)
    callback = ScoreMergeCallback(dirpath=tmp_path / "tvs")
    trainer = L.Trainer(max_steps=8, limit_val_batches=0, callbacks=[callback], **QUIET)
    trainer.fit(resumed, datamodule=digits(train_domains=["rot45"]), ckpt_path=checkpoint)
    assert trainer.global_step == 8
    tv = TaskVector.load(callback.task_vector_path)  # measured from θ₀, the base: not from the checkpoint's weights
    expected = merge_and_unload_update(resumed, quick_base)
    for key in tv:
        torch.testing.assert_close(tv[key].double(), expected[key], rtol=0, atol=1e-6, msg=key)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert at_four[key].any() and not torch.equal(tv[key], at_four[key])  # 4 more steps of the same adapters


def test_the_command_line_takes_the_lora_settings(quick_base: Path, tmp_path: Path) -> None:
    """A real ``lightning-score fit`` process: ``--model.lora.rank`` and ``--model.lora.targets`` reach the expert."""
    command = [
        sys.executable, "-m", "lightning_score.cli", "fit", f"--model.model_name={MODEL}",
        f"--model.pretrained={quick_base}", "--model.templates=digits", "--model.lr=1e-2", "--model.warmup_steps=1",
        "--model.lora.rank=2", "--model.lora.alpha=6", "--model.lora.targets=[mlp.c_fc]",
        "--data.root=builtin:digits", "--data.train_domains=[rot0]", "--data.batch_size=16", "--data.num_workers=0",
        "--trainer.accelerator=cpu", "--trainer.max_steps=3", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
        "--trainer.default_root_dir=run", "--trainer.callbacks+=lightning_score.ScoreMergeCallback",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=worker_environment(), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tv = TaskVector.load(tmp_path / "run" / "task_vectors" / "rot0.safetensors")
    assert sorted(tv) == _float_keys(CLIPExpert(MODEL, str(quick_base)).image_encoder)
    changed = sorted(k for k in tv if tv[k].any())
    assert changed == [f"transformer.resblocks.{i}.mlp.c_fc.weight" for i in (0, 1)]  # only the targets
    singular = torch.linalg.svdvals(tv[changed[0]].double())
    assert singular[2] < 1e-4 * singular[1]  # rank 2, up to the rounding of θ₀ + ΔW in float32
    adapters = tv.metadata["adapters"]["adapters"]["default"]
    assert adapters["r"] == [2] and adapters["lora_alpha"] == [6.0] and adapters["scaling"] == [3.0]
