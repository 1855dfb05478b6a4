"""ScoreTrainer: Lightning's Trainer plus merge, which writes the merged weights and leaves the Trainer as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_score import MergeModule
from lightning_score.cli import ScoreTrainer
from tests.experts import MODEL, QUIET, digits


def _module(quick_base: Path, expert_task_vectors: dict[str, Path]) -> MergeModule:
    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot30")]
    return MergeModule(MODEL, str(quick_base), task_vectors=paths, method="average", templates="digits")


def test_merge_without_testing_writes_the_weights_and_restores_the_test_limit(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    trainer = ScoreTrainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, **QUIET)
    assert trainer.merged_path is None  # declared, before any merge
    before = trainer.limit_test_batches
    data = digits(train_domains=["rot0", "rot30"], test_domains=["rot60"])
    assert trainer.merge(_module(quick_base, expert_task_vectors), datamodule=data, test=False) == {}
    assert trainer.merged_path == tmp_path / "merged" / "average.safetensors" and trainer.merged_path.is_file()
    assert trainer.limit_test_batches == before  # a later test runs every batch again
    results = trainer.test(_module(quick_base, expert_task_vectors), datamodule=data, verbose=False)
    assert 0.0 <= results[0]["test/rot60/acc"] <= 1.0


def test_merge_restores_the_test_limit_when_the_merge_fails(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    trainer = ScoreTrainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, limit_test_batches=3, **QUIET)
    module = MergeModule(MODEL, str(quick_base), task_vectors=[str(tmp_path / "missing.safetensors")],
                         method="average", templates="digits")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        trainer.merge(module, datamodule=digits(train_domains=["rot0"], test_domains=["rot60"]), test=False)
    assert trainer.limit_test_batches == 3 and trainer.merged_path is None


def test_merge_refuses_what_is_not_one_set_of_weights(quick_base: Path, expert_task_vectors: dict[str, Path]) -> None:
    trainer = ScoreTrainer(accelerator="cpu", devices=1, **QUIET)
    ensemble = MergeModule(MODEL, str(quick_base), task_vectors=[str(expert_task_vectors["rot0"])], mode="ensemble",
                           templates="digits")  # fmt: skip
    with pytest.raises(ValueError, match="mode='ensemble' is T models"):
        trainer.merge(ensemble)
    with pytest.raises(ValueError, match="--output must end in .safetensors"):
        trainer.merge(_module(quick_base, expert_task_vectors), output="merged.pt")


def test_merge_refuses_an_export_target_it_could_not_write_before_merging(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    trainer = ScoreTrainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, **QUIET)
    data = digits(train_domains=["rot0", "rot30"], test_domains=["rot60"])
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("an earlier export")
    for export, message in (("a-file", "is a file: choose a folder path"), ("full", "pass --overwrite true")):
        module = _module(quick_base, expert_task_vectors)
        with pytest.raises(FileExistsError, match=f"--export folder '.*{export}' .*{message}"):
            trainer.merge(module, datamodule=data, export=str(tmp_path / export))
        assert module.merged is None  # refused before the merge
    assert (tmp_path / "full" / "kept.txt").read_text() == "an earlier export"
    assert not (tmp_path / "merged").exists()  # no weights file written either
