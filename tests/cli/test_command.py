"""The lightning-score command: every recipe parses, fit -> merge -> test works, bad input gets one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.cli import main
from tests.experts import MODEL

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def _subcommand(recipe: Path) -> list[str]:
    """How a recipe is used: its subcommand and, for the add-on files, the recipe it is added to."""
    name, folder = recipe.name, recipe.parent.name
    if folder == "models":
        return ["fit", "--config", str(RECIPES / "pacs/vit_b32_expert.yaml"), "--config", str(recipe)]
    if name in ("ddp_fit.yaml", "fsdp_fit.yaml"):
        return ["fit", "--config", str(RECIPES / "pacs/vit_b32_expert.yaml"), "--config", str(recipe)]
    if name == "sharded_merge.yaml":
        return ["merge", "--config", str(RECIPES / "pacs/vit_b32_merge.yaml"), "--config", str(recipe)]
    if name == "ddp_test.yaml":
        return ["test", "--config", str(RECIPES / "digits/test.yaml"), "--config", str(recipe)]
    for suffix, command in (
        ("expert.yaml", "fit"),
        ("merge.yaml", "merge"),
        ("test.yaml", "test"),
        ("study.yaml", "study"),
    ):
        if name.endswith(suffix):
            return [command, "--config", str(recipe)]
    if name.startswith("study_"):  # study_more_baselines.yaml and friends
        return ["study", "--config", str(recipe)]
    raise AssertionError(f"no rule for {recipe}")


ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))


def test_there_are_recipes_for_every_dataset_and_backbone() -> None:
    names = {str(p.relative_to(RECIPES)) for p in ALL_RECIPES}
    for dataset in ("digits", "pacs", "office_home", "terra_incognita", "domainnet", "vlcs"):
        assert any(n.startswith(dataset + "/") and n.endswith("merge.yaml") for n in names), dataset
    assert {
        "models/vit_b16.yaml",
        "models/vit_l14.yaml",
        "multi_gpu/ddp_fit.yaml",
        "multi_gpu/fsdp_fit.yaml",
        "multi_gpu/sharded_merge.yaml",
    } <= names


# the study command's recipes are parsed by tests/study/test_checks.py::test_the_recipes_parse
TRAINER_RECIPES = [recipe for recipe in ALL_RECIPES if _subcommand(recipe)[0] != "study"]


@pytest.mark.parametrize("recipe", TRAINER_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_parses_through_the_cli(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    args = _subcommand(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "class_path: lightning_score." in printed and "root:" in printed


@pytest.mark.parametrize("command", ["fit", "merge", "test", "validate", "predict"])
def test_help_documents_the_arguments(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--model" in text and "--data.help" in text and "--trainer" in text
    assert "--optimizer" in text and "--lr_scheduler" in text  # where LightningCLI users expect them
    if command == "merge":
        assert "--output" in text and "--test" in text and "merged weights" in text
    with pytest.raises(SystemExit):
        main([command, "--data.help", "DomainDataModule"])  # the default datamodule's own arguments
    assert "--data.root" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    usage = " ".join(text[: text.index("Train-then-merge")].split())
    assert usage.startswith("usage: ") and "{fit,validate,test,predict,merge,analyze,study}" in usage
    listed = text[text.index("Available subcommands:") :]
    for command in ("fit", "validate", "test", "predict", "merge", "analyze", "study"):
        assert f"\n    {command} " in listed, command


def test_an_unknown_command_ends_with_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["anlyze", "--task_vectors=[a.safetensors]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "lightning-score: error: unknown command 'anlyze'; the commands are fit, validate, test, predict, merge, "
        "analyze, study."
    )


def test_fit_merge_test_through_the_cli(
    quick_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [f"--model.init_args.model_name={MODEL}", f"--model.init_args.pretrained={quick_base}",
              "--trainer.enable_progress_bar=false"]  # fmt: skip
    for domain in ("rot0", "rot15"):
        main(["fit", "--config", str(RECIPES / "digits/expert.yaml"), f"--data.train_domains=[{domain}]",
              "--trainer.max_steps=3", "--model.init_args.warmup_steps=1", "--trainer.logger=false", *common])  # fmt: skip
    task_vectors = tmp_path / "runs/digits/task_vectors"
    assert sorted(p.name for p in task_vectors.iterdir()) == ["pretrained", "rot0.safetensors", "rot15.safetensors"]
    assert TaskVector.load(task_vectors / "rot15.safetensors").domain == "rot15"

    tvs = f"[{task_vectors / 'rot0.safetensors'}, {task_vectors / 'rot15.safetensors'}]"
    main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.init_args.task_vectors={tvs}",
          "--data.train_domains=[rot0, rot15]", "--data.test_domains=[rot30]", *common])  # fmt: skip
    merged = tmp_path / "runs/digits/merged/score.safetensors"
    assert merged.exists() and merged.with_suffix(".yaml").exists()
    assert "method: score" in merged.with_suffix(".yaml").read_text()
    out = capsys.readouterr().out
    assert re.search(r"^domain +acc +balanced_acc\n^rot30 +0\.\d{4} +0\.\d{4}$", out, re.MULTILINE), out[-500:]

    main(["test", "--config", str(RECIPES / "digits/test.yaml"), f"--model.init_args.model_name={MODEL}",
          "--data.test_domains=[rot30, rot45]", "--trainer.enable_progress_bar=false"])  # fmt: skip
    out = capsys.readouterr().out  # one table, a row per test domain
    table = re.search(r"^domain +acc +balanced_acc\n((?:rot\d+ +0\.\d{4} +0\.\d{4}\n)+)", out, re.MULTILINE)
    assert table is not None and [row.split()[0] for row in table.group(1).splitlines()] == ["rot30", "rot45"], out

    from lightning_score.models import build_clip

    merged_model = build_clip(MODEL, str(merged)).model.visual.state_dict()
    base = build_clip(MODEL, str(quick_base)).model.visual.state_dict()
    assert any(not torch.equal(merged_model[k], base[k]) for k in base)


def test_analyze_prints_and_writes(
    expert_task_vectors: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    paths = ", ".join(str(expert_task_vectors[d]) for d in ("rot0", "rot30", "rot60"))
    main(["analyze", f"--task_vectors=[{paths}]", f"--output_dir={tmp_path / 'analysis'}"])
    out = capsys.readouterr().out
    assert "Subspace Alignment Ratio" in out and "rot30" in out and "Effective rank" in out
    assert {p.name for p in (tmp_path / "analysis").iterdir()} == {"sar.json", "sar.png", "spectra.json", "spectra.png"}


def test_analyze_writes_beside_its_task_vectors_not_into_the_working_folder(
    expert_task_vectors: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "runs" / "task_vectors"
    folder.mkdir(parents=True)
    for domain in ("rot0", "rot30"):
        shutil.copy(expert_task_vectors[domain], folder / f"{domain}.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["analyze", f"--task_vectors=[{folder / 'rot0.safetensors'}, {folder / 'rot30.safetensors'}]"])
    assert list(elsewhere.iterdir()) == []
    assert {p.name for p in (folder / "analysis").iterdir()} == {"sar.json", "sar.png", "spectra.json", "spectra.png"}
    assert f"Wrote {folder / 'analysis' / 'sar.json'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "default analysis/ in the task vectors' folder" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge", "--config", str(RECIPES / "digits/merge.yaml")], "rot0.safetensors' does not exist"),
        (["fit", "--config", str(RECIPES / "digits/expert.yaml"), "--data.train_domains=[rot99]"], "Domain 'rot99'"),
        (
            ["test", "--config", str(RECIPES / "digits/test.yaml")],
            "If it is a merged model, write it first with `lightning-score merge`",
        ),
    ],
    ids=["missing-task-vector", "unknown-domain", "merged-file-never-written"],
)
def test_bad_input_ends_with_one_clear_line(args: list[str], message: str, quick_base: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    overrides = [f"--model.init_args.model_name={MODEL}"]
    if args[0] != "test":
        overrides.append(f"--model.init_args.pretrained={quick_base}")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-score: error: ") and message in err[-1]
    assert not (tmp_path / "runs/digits/merged").exists()


def test_task_vector_of_another_base_is_refused(expert_task_vectors: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    tvs = f"[{expert_task_vectors['rot0']}]"
    with pytest.raises(SystemExit):
        main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.init_args.model_name={MODEL}",
              "--model.init_args.pretrained=null", f"--model.init_args.task_vectors={tvs}"])  # fmt: skip
    assert "was made from different pre-trained weights" in capsys.readouterr().err
