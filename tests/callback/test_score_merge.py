"""ScoreMergeCallback on plain Trainers and LightningModules that are not CLIPExpert."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_score import ScoreMergeCallback, TaskVector
from lightning_score.task_vector import state_dict_fingerprint
from tests.modules import Regressor, data, trainer

_data = data
_trainer = trainer


def test_writes_finetuned_minus_pretrained_of_the_trainable_parameters(tmp_path: Path) -> None:
    model = Regressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = ScoreMergeCallback(dirpath=tmp_path / "tvs", name="reg")
    _trainer(tmp_path, [callback]).fit(model, _data())
    tv = TaskVector.load(tmp_path / "tvs" / "reg.safetensors")
    assert callback.task_vector_path == tmp_path / "tvs" / "reg.safetensors"
    assert sorted(tv) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]  # frozen + buffers skipped
    for key in tv:
        torch.testing.assert_close(tv[key], model.state_dict()[key] - before[key], rtol=0, atol=0)
        assert tv[key].abs().sum() > 0
    assert tv.base_fingerprint == state_dict_fingerprint({k: before[k] for k in tv})
    assert tv.metadata["global_step"] == 6 and tv.name == "reg"


def test_image_encoder_and_explicit_module_paths(tmp_path: Path) -> None:
    model = Regressor(encoder_attr=True)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    _trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, filename="enc.safetensors")]).fit(model, _data())
    tv = TaskVector.load(tmp_path / "enc.safetensors")
    assert sorted(tv) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # keys relative to the submodule
    torch.testing.assert_close(tv["0.weight"], model.head[0].weight.detach() - before["0.weight"])
    model = Regressor()
    _trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, module="head.2", name="last")]).fit(model, _data())
    assert sorted(TaskVector.load(tmp_path / "last.safetensors")) == ["bias", "weight"]


def test_default_location_is_under_the_trainer_root(tmp_path: Path) -> None:
    _trainer(tmp_path, [ScoreMergeCallback()]).fit(Regressor(), _data())
    assert (tmp_path / "task_vectors" / "Regressor.safetensors").exists()


def test_bad_module_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no attribute 'visual'"):
        _trainer(tmp_path, [ScoreMergeCallback(module="visual")]).fit(Regressor(), _data())


def test_resume_subtracts_the_original_pretrained_weights(tmp_path: Path) -> None:
    """fit 4 steps (one epoch) -> checkpoint -> a new process resumes to 8: τ is θ_8 − θ_0, not θ_8 − θ_4."""
    original = {k: v.clone() for k, v in Regressor().state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    _trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path / "a", name="x"), checkpoint], max_steps=4,
             enable_checkpointing=True).fit(Regressor(), _data())  # fmt: skip
    resumed_model = Regressor()
    with torch.no_grad():  # the resumed process starts from different weights, as a generic module may
        for p in resumed_model.head.parameters():
            p.add_(1.0)
    callback = ScoreMergeCallback(dirpath=tmp_path / "b", name="x")
    _trainer(tmp_path, [callback], max_steps=8).fit(resumed_model, _data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    tv = TaskVector.load(tmp_path / "b" / "x.safetensors")
    assert tv.metadata["global_step"] == 8
    for key in tv:
        torch.testing.assert_close(tv[key], resumed_model.state_dict()[key] - original[key], rtol=0, atol=1e-7)
    # and it equals an uninterrupted 8-step fit
    straight = Regressor()
    _trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path / "c", name="x")], max_steps=8).fit(straight, _data())
    uninterrupted = TaskVector.load(tmp_path / "c" / "x.safetensors")
    for key in tv:
        torch.testing.assert_close(tv[key], uninterrupted[key], rtol=0, atol=1e-6)


def test_merge_with_earlier_experts_swaps_weights_for_test_and_restores_them(tmp_path: Path) -> None:
    first = Regressor()
    _trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="a")]).fit(first, _data())
    model = Regressor()
    callback = ScoreMergeCallback(dirpath=tmp_path, name="b", merge_with=[tmp_path / "a.safetensors"], method="average")
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(model, _data())
    assert callback.merged_path == tmp_path / "merged-average.safetensors"
    merged = TaskVector.load(callback.merged_path)
    a, b = TaskVector.load(tmp_path / "a.safetensors"), TaskVector.load(tmp_path / "b.safetensors")
    for key in merged:
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
    expert = {k: v.clone() for k, v in model.state_dict().items()}
    seen_during_test = {}

    class Spy(pl.Callback):
        def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
            seen_during_test.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Spy())
    trainer.test(model, _data(), verbose=False)
    pretrained = Regressor().state_dict()
    for key in merged:  # the merged weights were in place during the test ...
        torch.testing.assert_close(seen_during_test[key], pretrained[key] + merged[key], rtol=0, atol=1e-6)
    for key, value in model.state_dict().items():  # ... and the expert is back afterwards
        assert torch.equal(value, expert[key]), key


def test_merge_with_checks_files_before_training(tmp_path: Path) -> None:
    model = Regressor()
    with pytest.raises(FileNotFoundError, match="missing.safetensors' does not exist"):
        _trainer(tmp_path, [ScoreMergeCallback(merge_with=[tmp_path / "missing.safetensors"])]).fit(model, _data())
    assert model.seen.item() == 0  # nothing trained
    foreign = TaskVector({"head.0.weight": torch.zeros(6, 8)}, {"base_fingerprint": "blake2b:0000"})
    foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="foreign.safetensors' was made from different pre-trained weights"):
        _trainer(tmp_path, [ScoreMergeCallback(merge_with=[tmp_path / "foreign.safetensors"])]).fit(model, _data())
    assert model.seen.item() == 0
    with pytest.raises(ValueError, match="Unknown merge method 'magic'"):
        ScoreMergeCallback(merge_with=[tmp_path / "foreign.safetensors"], method="magic")


def test_clip_expert_task_vector_is_its_image_encoder_update(quick_base: Path, tmp_path: Path) -> None:
    """On CLIPExpert the snapshot is the image encoder (a property over clip.visual), keys relative to it."""
    from lightning_score import CLIPExpert
    from tests.experts import MODEL, digits

    expert = CLIPExpert(MODEL, str(quick_base), templates="digits", lr=1e-3, warmup_steps=1)
    before = {k: v.clone() for k, v in expert.image_encoder.state_dict().items()}
    callback = ScoreMergeCallback(dirpath=tmp_path)
    _trainer(tmp_path, [callback], max_steps=3, num_sanity_val_steps=0).fit(
        expert, datamodule=digits(train_domains=["rot15"])
    )
    tv = TaskVector.load(callback.task_vector_path)
    assert callback.task_vector_path.name == "rot15.safetensors" and tv.domain == "rot15"
    assert sorted(tv) == sorted(k for k, v in before.items() if v.is_floating_point())
    assert "transformer.resblocks.0.attn.in_proj_weight" in tv
    for key in tv:
        torch.testing.assert_close(tv[key], expert.image_encoder.state_dict()[key] - before[key], rtol=0, atol=0)
    assert tv.base_fingerprint == expert.pretrained_fingerprint
