"""The study command end to end on a reduced digits study: outputs, resuming, and refusing mixed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_score.cli import main
from lightning_score.study import ExpertSettings, Row, run_study
from lightning_score.study.runner import Study
from tests.conftest import QUICK_BASE

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DOMAINS = ["rot0", "rot30", "rot60"]
ROWS = [
    Row("SCORE"),
    Row("SCORE (diagonal only)", options={"variant": "diagonal"}),
    Row("TSV-M", method="tsv"),
    Row("TIES", method="ties"),
    Row("ESM", method="esm"),
    Row("Zero-shot", mode="zeroshot"),
    Row("Logit ensemble", mode="ensemble"),
    Row("Expert (target domain)", mode="expert"),
]
QUICK_EXPERT = ExpertSettings(lr=1e-3, warmup_steps=2, max_steps=8, max_epochs=None, batch_size=64)


def _study(output_dir: Path, quick_base: Path, **overrides: object) -> list[dict]:
    settings = dict(output_dir=str(output_dir), model_name=QUICK_BASE["model_name"], pretrained=str(quick_base),
                    domains=DOMAINS, targets=["rot30", "rot60"], expert=QUICK_EXPERT, rows=ROWS, proxy_images=8,
                    accelerator="cpu")  # fmt: skip
    settings.update(overrides)
    return run_study(**settings)


@pytest.fixture(scope="module")
def finished(quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("study")
    return folder, _study(folder, quick_base)


def test_outputs(finished: tuple[Path, list[dict]]) -> None:
    folder, records = finished
    expected = {
        "results.csv",
        "results.json",
        "results.md",
        "accuracy.png",
        "sar.png",
        "sar.json",
        "study.yaml",
        "study.log",
    }
    assert expected <= {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in (folder / "task_vectors").iterdir()) == [f"{d}.safetensors" for d in DOMAINS]
    assert len(records) == 2 * len(ROWS) and json.loads((folder / "results.json").read_text()) == records
    for record in records:
        assert 0.0 <= record["acc"] <= 1.0 and 0.0 <= record["balanced_acc"] <= 1.0
        if record["mode"] == "merge":
            assert record["merge_seconds"] > 0 and record["peak_memory_mb"] is not None
            assert record["sources"] == [d for d in DOMAINS if d != record["target"]]
    expert_rows = [r for r in records if r["mode"] == "expert"]
    assert all(r["sources"] == [r["target"]] for r in expert_rows)
    csv_lines = (folder / "results.csv").read_text().splitlines()
    assert (
        csv_lines[0].startswith("method,mode,target,acc,balanced_acc,merge_seconds,peak_memory_mb")
        and len(csv_lines) == 17
    )


def test_markdown_table_is_paper_style(finished: tuple[Path, list[dict]]) -> None:
    folder, records = finished
    table = (folder / "results.md").read_text()
    assert "| Method | rot30 | rot60 | Mean |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [line.split("|")[1].strip().strip("*") for line in lines] == [row.name for row in ROWS]
    score = next(r for r in records if r["method"] == "SCORE" and r["target"] == "rot30")
    assert f"{100 * score['acc']:.2f}" in lines[0]
    bold_rows = [line for line in lines if "**" in line.split("|", 2)[2]]
    assert bold_rows and all(not line.startswith("| *") for line in bold_rows)  # reference rows are not ranked


def test_interrupted_after_the_experts_a_rerun_reuses_them(
    quick_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Study, "_evaluate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            _study(tmp_path, quick_base, rows=ROWS[:2], targets=["rot30"])
    experts = {p: p.stat().st_mtime_ns for p in (tmp_path / "task_vectors").iterdir()}
    assert len(experts) == 3 and not (tmp_path / "results").exists()

    fits = []
    original = Study._expert

    def counting(self: Study, domain: str) -> Path:
        path = original(self, domain)
        fits.append(path.stat().st_mtime_ns != experts[path])
        return path

    monkeypatch.setattr(Study, "_expert", counting)
    _study(tmp_path, quick_base, rows=ROWS[:2], targets=["rot30"])
    assert fits == [False, False, False]  # every expert was reused, none fine-tuned again
    assert {p: p.stat().st_mtime_ns for p in experts} == experts
    log = (tmp_path / "study.log").read_text()
    assert log.count("reused") >= 3

    # a finished evaluation is reused too; a missing one is redone
    removed = tmp_path / "results/rot30/score-diagonal-only.json"
    kept = tmp_path / "results/rot30/score.json"
    kept_time = kept.stat().st_mtime_ns
    removed.unlink()
    _study(tmp_path, quick_base, rows=ROWS[:2], targets=["rot30"])
    assert removed.exists() and kept.stat().st_mtime_ns == kept_time


def test_changed_settings_are_refused_or_redone(quick_base: Path, tmp_path: Path) -> None:
    _study(tmp_path, quick_base, rows=ROWS[5:6], targets=["rot30"], domains=["rot0", "rot30"])
    changed = ExpertSettings(lr=2e-3, warmup_steps=2, max_steps=8, max_epochs=None, batch_size=64)
    with pytest.raises(
        ValueError, match=r"rot0.safetensors' was made with different settings \(expert differ\).*--restart true"
    ):
        _study(tmp_path, quick_base, rows=ROWS[5:6], targets=["rot30"], domains=["rot0", "rot30"], expert=changed)
    records = _study(
        tmp_path, quick_base, rows=ROWS[5:6], targets=["rot30"], domains=["rot0", "rot30"], expert=changed, restart=True
    )
    from lightning_score import TaskVector

    assert TaskVector.load(tmp_path / "task_vectors/rot0.safetensors").metadata["expert_config"]["expert"]["lr"] == 2e-3
    assert records[0]["method"] == "Zero-shot"


def test_bad_study_input(quick_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"domains \['rot99'\] are not domains of the data"):
        _study(tmp_path, quick_base, domains=["rot0", "rot99"])
    with pytest.raises(ValueError, match="at least 2 domains"):
        _study(tmp_path, quick_base, domains=["rot0"], targets=["rot0"])
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(RECIPES / "digits/study.yaml"), "--targets=[rot99]", f"--output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "targets ['rot99'] are not domains of the data" in capsys.readouterr().err


def test_the_recipes_parse(capsys: pytest.CaptureFixture) -> None:
    for recipe in sorted(RECIPES.rglob("*study.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main(["study", "--config", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "output_dir:" in capsys.readouterr().out
