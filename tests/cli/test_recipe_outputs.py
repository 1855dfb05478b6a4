"""The expert recipes leave the task vectors' folder to ``default_root_dir``: a run moved there takes them along."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_score import TaskVector
from lightning_score.cli import main
from tests.experts import MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
EXPERT_RECIPES = sorted(p for p in RECIPES.rglob("*expert.yaml"))


def test_there_are_expert_recipes() -> None:
    assert len(EXPERT_RECIPES) >= 10 and RECIPES / "digits/expert.yaml" in EXPERT_RECIPES


@pytest.mark.parametrize("recipe", EXPERT_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_no_expert_recipe_pins_the_task_vectors_folder(recipe: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    (callback,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ScoreMergeCallback")]
    assert "dirpath" not in (callback.get("init_args") or {}), f"{recipe} pins the callback's dirpath"
    assert config["trainer"]["default_root_dir"].startswith("runs/")  # where the task vectors go by default


def test_the_digits_recipe_writes_under_the_default_root_dir_it_is_given(
    quick_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPES / "digits/expert.yaml"), "--trainer.default_root_dir", "runs/mine",
          f"--model.init_args.model_name={MODEL}", f"--model.init_args.pretrained={quick_base}",
          "--data.train_domains=[rot15]", "--trainer.max_steps=2", "--model.init_args.warmup_steps=1",
          "--trainer.logger=false", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert TaskVector.load(tmp_path / "runs/mine/task_vectors/rot15.safetensors").domain == "rot15"
    assert not (tmp_path / "runs/digits").exists()
