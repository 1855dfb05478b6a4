"""An interrupted study continues where it stopped; changed settings are refused (or redone on request)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_score import TaskVector
from lightning_score.study import ExpertSettings, Row
from lightning_score.study.runner import Study
from tests.study.conftest import ROWS, quick_study

TWO_ROWS = [ROWS[1], ROWS[3], Row("SCORE auto", alpha="auto")]  # TIES (+ α tuned), zero-shot, α searched in setup


def test_interrupted_after_the_experts_a_rerun_reuses_them(
    mini_digits: Path, quick_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Study, "_evaluate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            quick_study(tmp_path, mini_digits, quick_base, rows=TWO_ROWS, targets=["rot30"])
    experts = {p: p.stat().st_mtime_ns for p in (tmp_path / "task_vectors/seed-0").glob("*.safetensors")}
    assert len(experts) == 3 and not (tmp_path / "results").exists()

    fits: list[str] = []
    monkeypatch.setattr("lightning_score.study.runner.fit_task_vector", lambda fit, *args: fits.append(fit.name))
    quick_study(tmp_path, mini_digits, quick_base, rows=TWO_ROWS, targets=["rot30"])
    assert fits == []  # every expert was reused, none fine-tuned again
    assert {p: p.stat().st_mtime_ns for p in experts} == experts
    assert (tmp_path / "study.log").read_text().count("reused") >= 3

    # a finished evaluation is reused; a missing one is redone, even when only its α-tuned half is missing
    folder = tmp_path / "results/seed-0/rot30"
    assert sorted(p.name for p in folder.iterdir()) == [
        "score-auto.json", "ties-alpha-tuned.json", "ties.json", "zero-shot.json"
    ]  # fmt: skip
    kept = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    (folder / "ties-alpha-tuned.json").unlink()
    records = quick_study(tmp_path, mini_digits, quick_base, rows=TWO_ROWS, targets=["rot30"])
    assert (folder / "ties-alpha-tuned.json").exists()
    assert (folder / "ties.json").stat().st_mtime_ns == kept["ties.json"]
    assert (folder / "zero-shot.json").stat().st_mtime_ns == kept["zero-shot.json"]
    assert [r["method"] for r in records] == ["TIES", "TIES (α tuned)", "Zero-shot", "SCORE auto"]
    auto = records[-1]
    assert auto["section"] == "data" and auto["alpha"] == auto["alpha_search"]["selected"] != "auto"
    assert (folder / "score-auto.json").stat().st_mtime_ns == kept["score-auto.json"]


def test_changed_settings_are_refused_or_redone(mini_digits: Path, quick_base: Path, tmp_path: Path) -> None:
    run = dict(rows=[ROWS[3]], targets=["rot30"], domains=["rot0", "rot30"])
    quick_study(tmp_path, mini_digits, quick_base, **run)
    changed = ExpertSettings(lr=2e-3, warmup_steps=1, max_steps=6, max_epochs=None, batch_size=32)
    with pytest.raises(ValueError, match=r"rot0.safetensors' was made with different settings than this study "
                       r"\(expert.lr: 0.001 kept, 0.002 in this study\)"):  # fmt: skip
        quick_study(tmp_path, mini_digits, quick_base, expert=changed, **run)
    with pytest.raises(ValueError, match="--restart true"):
        quick_study(tmp_path, mini_digits, quick_base, expert=changed, **run)
    records = quick_study(tmp_path, mini_digits, quick_base, expert=changed, restart=True, **run)
    tv = TaskVector.load(tmp_path / "task_vectors/seed-0/rot0.safetensors")
    assert tv.metadata["expert_config"]["expert"]["lr"] == 2e-3 and records[0]["method"] == "Zero-shot"
    # a new seed adds its own experts and results next to the first seed's, mixing nothing
    records = quick_study(tmp_path, mini_digits, quick_base, expert=changed, seeds=[0, 1], **run)
    assert [(r["seed"], r["method"]) for r in records] == [(0, "Zero-shot"), (1, "Zero-shot")]
    assert (tmp_path / "task_vectors/seed-1/rot30.safetensors").exists()


def test_a_damaged_kept_result_is_evaluated_again_with_a_warning_naming_it(
    mini_digits: Path, quick_base: Path, tmp_path: Path
) -> None:
    """An empty result JSON (a full disk, a copy stopped half-way) is redone, not a bare JSON error."""
    run = dict(rows=[ROWS[3]], targets=["rot30"], domains=["rot0", "rot30"])
    first = quick_study(tmp_path, mini_digits, quick_base, **run)
    path = tmp_path / "results/seed-0/rot30/zero-shot.json"
    good = json.loads(path.read_text())
    path.write_bytes(b"")
    with pytest.warns(UserWarning, match="evaluating it again") as caught:
        again = quick_study(tmp_path, mini_digits, quick_base, **run)
    assert any(f"The kept result '{path}' is damaged" in str(w.message) for w in caught)
    rewritten = json.loads(path.read_text())  # the same evaluation again (only its timings differ)
    assert rewritten["config"] == good["config"] and rewritten["record"]["correct"] == good["record"]["correct"]
    assert again[0]["acc"] == first[0]["acc"]
