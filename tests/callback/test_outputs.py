"""callback.outputs: what a fit writes at its end, never replacing another fit's task vector, nothing under fast_dev_run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_score import ScoreMergeCallback, TaskVector
from tests.modules import Regressor, data, trainer


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fast_dev_run_writes_nothing_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "tvs"
    trainer(tmp_path, [ScoreMergeCallback(dirpath=folder, name="x")]).fit(Regressor(), data())  # a real expert
    before = _files(folder)
    with caplog.at_level(logging.INFO):
        debug = trainer(tmp_path, [ScoreMergeCallback(dirpath=folder, name="x")], fast_dev_run=True, max_steps=-1)
        debug.fit(Regressor(seed=3), data())  # a debug run of another expert under the same name
    assert debug.global_step == 1
    assert _files(folder) == before  # the expert untouched; no θ₀ snapshot either
    assert "fast_dev_run: no θ₀ snapshot, task vector or merge is written" in caplog.text
    fresh = tmp_path / "fresh"
    trainer(tmp_path, [ScoreMergeCallback(dirpath=fresh)], fast_dev_run=2, max_steps=-1).fit(Regressor(), data())
    assert not fresh.exists()


def test_another_fits_task_vector_is_replaced_only_when_asked(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x", metadata={"seed": 0})]).fit(Regressor(), data())
    path = tmp_path / "x.safetensors"
    kept = path.read_bytes()
    for model, metadata, differ in [(Regressor(seed=1), {"seed": 0}, "base_fingerprint"),
                                    (Regressor(), {"seed": 1}, "seed")]:  # fmt: skip
        fit = trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x", metadata=metadata)])
        with pytest.raises(ValueError, match=rf"'{path}' holds the task vector of another fit \({differ} differ\), "
                                             r"which this fit would replace. Pass ScoreMergeCallback\(overwrite=True"):  # fmt: skip
            fit.fit(model, data())
        assert fit.global_step == 0 and path.read_bytes() == kept  # refused before any training
    replacing = ScoreMergeCallback(dirpath=tmp_path, name="x", metadata={"seed": 1}, overwrite=True)
    trainer(tmp_path, [replacing]).fit(Regressor(seed=1), data())
    assert TaskVector.load(path).metadata["seed"] == 1


def test_a_file_in_the_way_that_is_not_a_task_vector_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_text("my notes, not a task vector")
    with pytest.raises(ValueError, match=f"'{path}' is in the way and is not a task vector"):
        trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x")]).fit(Regressor(), data())
    assert path.read_text() == "my notes, not a task vector"


def test_the_same_fit_run_again_or_resumed_replaces_its_own(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x")]).fit(Regressor(), data())
    first = TaskVector.load(tmp_path / "x.safetensors", lazy=False)
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x")]).fit(Regressor(), data())  # a rerun
    again = TaskVector.load(tmp_path / "x.safetensors", lazy=False)
    assert again.metadata == first.metadata and all((again[k] == first[k]).all() for k in first)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    callback = ScoreMergeCallback(dirpath=tmp_path, name="y")
    trainer(tmp_path, [callback, checkpoint], max_steps=4, enable_checkpointing=True).fit(Regressor(), data())
    resumed = ScoreMergeCallback(dirpath=tmp_path, name="y")  # the same fit, trained on from its checkpoint
    trainer(tmp_path, [resumed], max_steps=8).fit(Regressor(), data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert TaskVector.load(tmp_path / "y.safetensors").metadata["global_step"] == 8
