"""The study folder: where fits and results are kept, and the reuse decision (match, refuse, or redo on restart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.study.config import Row, table_entries
from lightning_score.study.folder import StudyFolder, as_json
from lightning_score.study.stages import Fit

(TIES, TIES_TUNED) = sorted(table_entries([Row("TIES", method="ties")], tune_alpha=True), key=lambda e: e.tuned)


def test_the_paths_of_fits_results_and_locks(tmp_path: Path) -> None:
    folder = StudyFolder(tmp_path, first_seed=3)
    assert folder.task_vector_path("rot0") == tmp_path / "task_vectors/seed-3/rot0.safetensors"
    assert folder.fit_path(Fit("expert", 1, "rot0")) == tmp_path / "task_vectors/seed-1/rot0.safetensors"
    assert folder.fit_path(Fit("pooled", 1, "rot30")) == tmp_path / "task_vectors/seed-1/pooled/rot30.safetensors"
    result = folder.result_path(1, "rot30", TIES_TUNED)
    assert result == tmp_path / "results/seed-1/rot30/ties-alpha-tuned.json"
    assert folder.lock_path(result) == tmp_path / ".locks/results/seed-1/rot30/ties-alpha-tuned.lock"


def test_a_kept_result_is_reused_when_it_matches_refused_or_redone_when_not(tmp_path: Path) -> None:
    wanted = as_json({"kind": "evaluation", "sources": ("rot0",), "seed": 0})
    assert wanted["sources"] == ["rot0"]  # as it reads back from the file
    folder = StudyFolder(tmp_path, first_seed=0)
    assert folder.kept_results(0, "rot30", [TIES], {TIES.key: wanted}) == {}  # nothing kept yet
    path = folder.result_path(0, "rot30", TIES)
    path.parent.mkdir(parents=True)
    path.write_text(folder.result_text(wanted, {"acc": 0.5}))
    assert json.loads(path.read_text()) == {"config": wanted, "record": {"acc": 0.5}}
    assert folder.kept_results(0, "rot30", [TIES], {TIES.key: wanted}) == {"ties": {"acc": 0.5}}
    changed = {**wanted, "seed": 1, "extra": True}
    with pytest.raises(ValueError, match=r"different settings than this study \(extra: unset kept, true in this study; "
                       r"seed: 0 kept, 1 in this study\): Pass --restart true"):  # fmt: skip
        folder.kept_results(0, "rot30", [TIES], {TIES.key: changed})
    assert path.exists()  # refused, not deleted
    redo = StudyFolder(tmp_path, first_seed=0, restart=True)
    assert redo.kept_results(0, "rot30", [TIES], {TIES.key: changed}) == {} and not path.exists()


def test_a_kept_fit_is_compared_on_its_task_vectors_expert_config(tmp_path: Path) -> None:
    folder = StudyFolder(tmp_path, first_seed=0, restart=True)
    path = folder.task_vector_path("rot0")
    config = {"kind": "expert", "seed": 0}
    assert not folder.kept_fit(path, config)
    TaskVector({"w": torch.ones(2, 2)}, {"expert_config": config}).save(path)
    assert folder.kept_fit(path, config)
    with pytest.raises(ValueError, match=r"refit it with --stage experts --restart true"):
        folder.kept_fit(path, {**config, "seed": 1}, redo=False)  # --stage evaluate never redoes a fit
    assert path.exists()
    assert not folder.kept_fit(path, {**config, "seed": 1}) and not path.exists()  # restart: redone


@pytest.mark.parametrize("damage", ["", '{"config": {"kind": "evalu', '{"config": {}}', "[1, 2]"])
def test_a_damaged_kept_result_file_is_named_and_not_reused(damage: str, tmp_path: Path) -> None:
    """Cut off, empty or not the study's JSON: a warning naming the file, and the result counts as missing."""
    folder = StudyFolder(tmp_path, first_seed=0)
    path = folder.result_path(0, "rot30", TIES)
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    with pytest.warns(UserWarning, match="evaluating it again") as caught:
        assert folder.kept_results(0, "rot30", [TIES], {TIES.key: {"seed": 0}}) == {}
    assert f"The kept result '{path}' is damaged" in str(caught[0].message)
