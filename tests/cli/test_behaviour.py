"""The lightning-score command as a LightningCLI user meets it: errors, own classes, saved configs, optimisers."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

import lightning_score.cli.command as cli_command
import lightning_score.cli.trainer as cli_trainer
from lightning_score.cli import LightningScoreCLI, main
from tests.experts import MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
OWN_CLASSES = ["--model=tests.modules.Regressor", "--data=tests.modules.RegressionData",
               "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
               "--model.lr=0.1", "--data.batch_size=16"]  # fmt: skip
# (jsonargparse keeps init arguments of the same name when the class changes: the default classes' lr and
# batch_size would carry over, so they are set explicitly)


# --- item 12: the package's own message for input errors, the traceback for a failure while training ------


def test_a_corrupt_task_vector_is_reported_with_its_file_and_the_fix(
    quick_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corrupt = tmp_path / "rot0.safetensors"
    corrupt.write_bytes(b"\xff" * 64)  # safetensors itself says only "header too large"
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.model_name={MODEL}",
              f"--model.pretrained={quick_base}", f"--model.task_vectors=[{corrupt}]"])  # fmt: skip
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lightning-score: error: '{corrupt}' is not a safetensors file")
    assert "re-create it with TaskVector.save()" in last


def test_an_error_while_training_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="a bug in training_step") as error:  # not a one-line exit 2
        main(["fit", *OWN_CLASSES[:1], "--model=tests.modules.FailingRegressor", *OWN_CLASSES[1:],
              "--trainer.max_steps=5"])  # fmt: skip
    frames = [frame.name for frame in error.traceback]
    assert "training_step" in frames and "run" in frames


# --- item 15: any datamodule, configs never overwritten, optimisers, public LightningCLI API -------------


def test_own_model_and_datamodule_through_subclass_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", *OWN_CLASSES, "--model.width=5", "--data.batch_size=8", "--trainer.max_steps=3",
          "--trainer.callbacks+=lightning_score.ScoreMergeCallback", "--trainer.callbacks.dirpath=tvs",
          "--trainer.callbacks.name=mine"])  # fmt: skip
    from lightning_score import TaskVector

    tv = TaskVector.load(tmp_path / "tvs" / "mine.safetensors")
    assert tv["head.0.weight"].shape == (5, 8) and tv.metadata["global_step"] == 3


def _fit(*extra: str) -> None:
    main(["fit", *OWN_CLASSES, "--trainer.max_steps=2", "--trainer.default_root_dir=run", *extra])


def test_without_a_logger_each_command_keeps_its_latest_config_and_nothing_piles_up(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    _fit("--model.lr=0.1")
    _fit("--model.lr=0.2")  # another fit in the same folder: the fit's config is replaced, not numbered
    assert yaml.safe_load((run / "fit-config.yaml").read_text())["model"]["init_args"]["lr"] == 0.2
    tvs = f"[{expert_task_vectors['rot0']}, {expert_task_vectors['rot30']}]"
    common = [f"--model.model_name={MODEL}", f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false"]
    for method in ("score", "tsv"):  # the recipes' merges and tests run without a logger
        main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), *common, f"--model.pretrained={quick_base}",
              f"--model.task_vectors={tvs}", f"--model.method={method}", "--test=false",
              f"--output={run / 'merged' / method}.safetensors",
              "--data.train_domains=[rot0, rot30]", "--data.test_domains=[rot60]"])  # fmt: skip
    for domain in ("rot30", "rot60"):
        main(["test", "--config", str(RECIPES / "digits/test.yaml"), *common, f"--model.pretrained={quick_base}",
              f"--data.test_domains=[{domain}]", "--data.train_domains=[]"])  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["fit-config.yaml", "merged", "test-config.yaml"]
    assert yaml.safe_load((run / "test-config.yaml").read_text())["data"]["init_args"]["test_domains"] == ["rot60"]
    assert sorted(p.name for p in (run / "merged").iterdir()) == ["score.safetensors", "score.yaml", "tsv.safetensors",
                                                                   "tsv.yaml"]  # fmt: skip
    err = capsys.readouterr().err
    assert "config-1" not in err and "belongs to an earlier run" not in err


def test_with_a_logger_the_config_is_in_the_runs_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for lr in (0.1, 0.2):
        _fit(f"--model.lr={lr}", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir=run")
    logs = tmp_path / "run" / "lightning_logs"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["lightning_logs"]
    saved = [yaml.safe_load((logs / f"version_{v}" / "config.yaml").read_text()) for v in (0, 1)]
    assert [config["model"]["init_args"]["lr"] for config in saved] == [0.1, 0.2]


def test_optimizer_and_lr_scheduler_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="configure_optimizers` will be overridden"):
        run = LightningScoreCLI(args=["fit", *OWN_CLASSES, "--trainer.max_steps=3", "--optimizer=Adam",
                                      "--optimizer.lr=0.003", "--lr_scheduler=StepLR",
                                      "--lr_scheduler.step_size=1", "--lr_scheduler.gamma=0.5",
                                      "--data.batch_size=64"])  # fmt: skip
    (optimizer,) = run.trainer.optimizers
    assert isinstance(optimizer, torch.optim.Adam)
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert scheduler.last_epoch >= 1  # stepped at the end of each epoch
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003 * 0.5**scheduler.last_epoch)


def test_no_private_lightning_cli_members() -> None:
    """The CLI uses LightningCLI's and the Trainer's public API only (the one jsonargparse attribute it reads is
    pinned by test_top_level_help_lists_every_command)."""
    source = inspect.getsource(cli_command) + inspect.getsource(cli_trainer)
    private = set(re.findall(r"(?:self|super\(\)|LightningCLI|parser|self\.parser)\.(_[a-z]\w*)", source))
    assert private == set(), private
    assert "_subcommands_action" in source  # jsonargparse's, read with getattr and a fallback
