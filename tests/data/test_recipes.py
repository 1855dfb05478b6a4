"""Every dataset's recipes parse through the CLI and carry the paper's protocol for that dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_score.cli import main
from lightning_score.data.presets import PRESETS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _printed(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    return yaml.safe_load(captured.out)


@pytest.mark.parametrize("name", list(PRESETS))
def test_expert_and_merge_recipes_carry_the_datasets_protocol(name: str, capsys: pytest.CaptureFixture) -> None:
    preset = PRESETS[name]
    expert = _printed(["fit", "--config", str(RECIPES / name / "vit_b32_expert.yaml")], capsys)
    assert expert["model"]["init_args"]["templates"] == preset.templates
    assert expert["trainer"]["max_epochs"] == preset.epochs and expert["trainer"]["precision"] == "32-true"
    assert expert["data"]["init_args"]["preset"] == name and expert["data"]["init_args"]["val_fraction"] == 0.0
    assert expert["data"]["init_args"]["batch_size"] == 128 and expert["model"]["init_args"]["lr"] == 1e-5
    merge = _printed(["merge", "--config", str(RECIPES / name / "vit_b32_merge.yaml")], capsys)
    init = merge["model"]["init_args"]
    assert init["templates"] == preset.templates and init["method"] == "score" and init["alpha"] == 1.0
    assert (init["method_options"] or {}) == dict(preset.score_options)
    sources, targets = merge["data"]["init_args"]["train_domains"], merge["data"]["init_args"]["test_domains"]
    assert [Path(p).stem for p in init["task_vectors"]] == sources and len(targets) == 1
    assert len(sources) + 1 == len(preset.domains) and {preset.canonical_domain(d) for d in sources + targets} == set(
        preset.domains
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_study_recipe_carries_the_datasets_protocol(name: str, capsys: pytest.CaptureFixture) -> None:
    preset = PRESETS[name]
    study = _printed(["study", "--config", str(RECIPES / name / "vit_b32_study.yaml")], capsys)
    assert study["templates"] == preset.templates and study["val_fraction"] == 0.0 and study["split_seed"] == 17
    assert study["expert"]["max_epochs"] == preset.epochs and study["expert"]["precision"] == "32-true"
    assert (study["expert"]["lr"], study["expert"]["batch_size"], study["expert"]["warmup_steps"]) == (1e-5, 128, 500)
    if preset.score_options:  # the medical datasets: every SCORE row without the /T
        scores = [row for row in study["rows"] if row.get("method") == "score" and row.get("mode") == "merge"]
        assert len(scores) == 4 and all(row["options"]["divide_by_tasks"] is False for row in scores)
    else:  # --print_config shows the rows the study runs (the paper's table), SCORE's with its default threshold
        scores = [row for row in study["rows"] if row.get("method") == "score" and row.get("mode") == "merge"]
        assert len(scores) == 4 and all("divide_by_tasks" not in row["options"] for row in scores)
    assert study["dataset"] == name  # each recipe names its preset, so data of another dataset is refused


def test_backbone_overrides(capsys: pytest.CaptureFixture) -> None:
    for tag, model in (("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14")):
        study = _printed(
            ["study", "--config", str(RECIPES / "pacs/vit_b32_study.yaml"), "--config",
             str(RECIPES / f"study_backbones/{tag}_study.yaml"), "--output_dir", f"runs/pacs-study/{tag}"],
            capsys,
        )  # fmt: skip
        assert (study["model_name"], study["pretrained"], study["templates"]) == (model, "openai", "pacs")
        fit = _printed(
            ["fit", "--config", str(RECIPES / "fed_isic2019/vit_b32_expert.yaml"), "--config",
             str(RECIPES / f"models/{tag}.yaml")],
            capsys,
        )  # fmt: skip
        assert fit["model"]["init_args"]["model_name"] == model and fit["trainer"]["max_epochs"] == 20
