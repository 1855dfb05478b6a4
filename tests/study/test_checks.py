"""The whole study configuration is checked before any work: one line, exit status 2, in seconds, no fit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lightning_score.cli import main
from lightning_score.merging import get_method
from lightning_score.study import ExpertSettings, Row, StudyConfig
from lightning_score.study.config import Entry, check_rows, table_entries
from lightning_score.study.dataset import resolve_seeds
from lightning_score.study.runner import Study
from tests.experts import QUICK_BASE
from tests.study.conftest import QUICK_EXPERT, ROWS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DIGITS = str(RECIPES / "digits/study.yaml")


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if the study starts any real work (the base, a fit, an evaluation)."""
    started: list[str] = []

    def refuse(name: str):
        def call(*args: object, **kwargs: object) -> None:
            started.append(name)
            raise AssertionError(f"{name} started before the configuration was checked")

        return call

    monkeypatch.setattr("lightning_score.study.runner.fit_task_vector", refuse("a fit"))
    monkeypatch.setattr("lightning_score.study.runner.get_backbone", refuse("the base"))
    monkeypatch.setattr("lightning_score.study.runner.evaluate_row", refuse("an evaluation"))
    return started


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (
            "--rows=[{name: Mine, method: scroe}]",
            "rows[0] ('Mine'): Unknown merge method 'scroe'. Registered methods: score",
        ),
        (
            "--rows=[{name: ZS, mode: zero-shot}]",
            "rows[0] ('ZS') has mode 'zero-shot'; choose one of ['merge', 'zeroshot'",
        ),
        (
            "--rows=[{name: T, method: ties, options: {densty: 0.2}}]",
            "Unknown option(s) ['densty'] for merge method 'ties'",
        ),
        ("--rows=[{name: S, method: score, options: {variant: diag}}]", "Option variant='diag' is not valid"),
        ("--rows=[{name: S, alpha: best}]", "has alpha 'best': give a number or 'auto'"),
        ("--rows=[{name: E, mode: expert, alpha: auto}]", "alpha 'auto' applies to mode 'merge' only"),
        ("--rows=[{name: A}, {name: a}]", "Row names must be distinct"),
        (
            "--rows=[{name: R, method: regmean, options: {grams: mine}}]",
            "rows[0] ('R'): ['grams'] are statistics the study collects from the sources' proxy images",
        ),
        ("--model_name=ViT-X-99", "model_name 'ViT-X-99' is not an open_clip architecture"),
        ("--pretrained=/no/such/weights.safetensors", "neither an existing weights file nor an open_clip tag"),
        ("--templates=klingon", "klingon"),
        ("--seeds=[]", "seeds must be a non-empty list of distinct integers"),
        ("--alpha_search=binary", "alpha_search='binary': choose one of ['grid', 'golden']"),
        ("--expert.lr=0", "expert: need lr > 0"),
        ("--root=/no/such/dataset", "/no/such/dataset"),
        ("--backbone=jax", "Unknown backbone 'jax': use one of ['hf', 'open_clip', 'timm']"),
        ("--backbone_options={model_args: {}}", "['model_args'] are not options of backbone 'open_clip'"),
        ("--backbone=hf", "Row 'ESM': ESM merges open_clip experts only, not the 'hf' backbone's"),
    ],
)
def test_a_bad_setting_fails_in_one_line_before_any_work(
    argument: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture, no_work: list[str]
) -> None:
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", DIGITS, argument, f"--output_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-score: error: "), err
    assert message in err[0]
    assert time.perf_counter() - started < 20  # seconds, not the minutes a fit takes
    assert not no_work and not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_bad_domains_and_targets_fail_before_any_work(
    mini_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_work: list[str]
) -> None:
    for argument, message in (
        ("--domains=[rot0,rot99]", "domains ['rot99'] are not domains of the data"),
        ("--targets=[rot45]", "targets ['rot45'] are not domains of the data"),
        ("--domains=[rot0]", "needs at least 2 domains"),
        ("--backbone=hf --model_name=auto", "model_name: auto names open_clip's ViT-B-32; with backbone 'hf' set"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            arguments = ["study", "--config", DIGITS, f"--root={mini_digits}", *argument.split()]
            main([*arguments, f"--output_dir={tmp_path}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not no_work


def test_check_rows_and_sections() -> None:
    check_rows(ROWS, tune_alpha=True)
    with pytest.raises(ValueError, match="no rows"):
        check_rows([])
    with pytest.raises(ValueError, match="options apply to mode 'merge' only"):
        check_rows([Row("Z", mode="zeroshot", options={"z": 1.0})])
    with pytest.raises(ValueError, match="distinct"):  # a user row that collides with a tuned companion
        check_rows([Row("TIES", method="ties"), Row("TIES (alpha tuned)", method="ties")], tune_alpha=True)
    check_rows([Row("TIES", method="ties"), Row("TIES (alpha tuned)", method="ties")], tune_alpha=False)
    entries = table_entries([*ROWS, Row("SCORE auto", alpha="auto")], tune_alpha=True)
    sections = {e.name: e.section for e in entries}
    assert [e.name for e in entries] == [
        "SCORE", "TIES", "ESM", "SCORE auto", "SCORE (α tuned)", "TIES (α tuned)", "ESM (α tuned)",
        "Zero-shot", "Logit ensemble", "Pooled fine-tune (ERM)", "Expert (target domain)",
    ]  # fmt: skip
    assert sections["SCORE"] == "data-free" and sections["ESM"] == sections["SCORE auto"] == "data"
    assert sections["TIES (α tuned)"] == "data" and sections["Pooled fine-tune (ERM)"] == "reference"
    assert [e.name for e in table_entries(ROWS, tune_alpha=False)] == [row.name for row in ROWS]


def test_check_rows_looks_each_method_up_once_and_hands_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_score.study import config

    looked_up: list[str] = []

    def counted(name: str) -> object:
        looked_up.append(name)
        return get_method(name)

    monkeypatch.setattr(config, "get_method", counted)
    rows = [*ROWS, Row("DARE", method="dare_ties")]
    entries = check_rows(rows, tune_alpha=True)
    assert looked_up == ["score", "ties", "esm", "dare_ties"]  # one per merge row, none for the references
    assert [(e.name, e.section) for e in entries] == [(e.name, e.section) for e in table_entries(rows, True)]
    by_name = {e.name: e for e in entries}
    assert by_name["ESM"].method is by_name["ESM (α tuned)"].method is get_method("esm")
    assert by_name["ESM"].needs_data and not by_name["TIES"].needs_data and not by_name["Zero-shot"].needs_data
    assert by_name["DARE"].seeded and not by_name["TIES"].seeded and by_name["Zero-shot"].method is None
    with pytest.raises(ValueError, match="make entries with check_rows or table_entries"):
        Entry(Row("ESM", method="esm"))  # a merge line without its method would claim the data-free section
    with pytest.raises(ValueError, match="make entries with check_rows or table_entries"):
        Entry(Row("TIES", method="ties"), method=get_method("esm"))


def test_seeds_default_to_three_on_the_builtin_benchmark_and_one_on_real_data() -> None:
    assert resolve_seeds("builtin:digits", None, None) == [0, 1, 2]
    assert resolve_seeds("/data/PACS", None, None) == [0]
    assert resolve_seeds("/data/PACS", None, 5) == [5]  # the deprecated single seed
    assert resolve_seeds("builtin:digits", [3, 4], None) == [3, 4]
    with pytest.raises(ValueError, match="not both"):
        resolve_seeds("builtin:digits", [1, 2], 1)


def test_evaluations_use_the_fits_precision(mini_digits: Path, quick_base: Path, tmp_path: Path) -> None:
    """One precision setting for the whole study: expert.precision, for every fit and every evaluation."""
    settings = dict(
        output_dir=tmp_path, model_name=QUICK_BASE["model_name"], pretrained=str(quick_base), templates="digits",
        root=str(mini_digits), domains=None, targets=None, rows=ROWS, accelerator="cpu", devices=1,
        eval_batch_size=64, num_workers=0, split_seed=17, val_fraction=0.0, proxy_images=4, seeds=[0],
        alpha_tuning=True, alpha_search="grid", alpha_images=10, bootstrap=100, restart=False,
    )  # fmt: skip
    for precision in ("bf16-mixed", "32-true"):
        expert = ExpertSettings(**{**QUICK_EXPERT.__dict__, "precision": precision})
        study = Study(StudyConfig(expert=expert, **settings))
        assert study.eval_trainer.precision == precision
    with pytest.raises(ValueError, match="expert.precision='fp7'"):
        Study(StudyConfig(expert=ExpertSettings(precision="fp7"), **settings))


def test_the_recipes_parse(capsys: pytest.CaptureFixture) -> None:
    recipes = sorted({*RECIPES.rglob("*study.yaml"), *RECIPES.rglob("study_*.yaml")})
    assert RECIPES / "digits" / "study_more_baselines.yaml" in recipes
    for recipe in recipes:
        with pytest.raises(SystemExit) as exit_info:
            main(["study", "--config", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None)
        assert "output_dir:" in capsys.readouterr().out


def test_paper_weights_that_cannot_download_are_one_line_naming_how_to_give_a_local_file(tmp_path: Path) -> None:
    """Real data and no model options: ViT-B/32 with the `openai` weights, offline and not cached (as in `fit`)."""
    import subprocess
    import sys

    from tests.data.generate import domainbed
    from tests.processes import worker_environment

    root = domainbed(tmp_path / "data", {d: {"dog": 3, "horse": 3} for d in ("a", "b", "c")})
    env = worker_environment(HF_HOME=str(tmp_path / "empty-hf-cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_score.cli", "study", f"--root={root}", f"--output_dir={tmp_path / 'out'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()  # one line: no chained traceback, no open_clip log line before it
    assert line.startswith("lightning-score: error: Could not get open_clip weights 'openai' for 'ViT-B-32'")
    assert "pass its path instead: pretrained='/path/to/open_clip_model.safetensors'" in line
    assert "--pretrained for `lightning-score study`" in line
