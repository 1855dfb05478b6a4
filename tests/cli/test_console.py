"""What a run prints: one merge line with its options, one results table, no library noise, ``dir()``."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

import lightning_score
from lightning_score.cli import LightningScoreCLI, main
from lightning_score.cli.console import EpochProgressBar, quiet_library_noise, results_table
from tests.experts import MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_results_table_has_one_row_per_domain() -> None:
    domains = [f"rot{15 * i}" for i in range(6)]
    metrics = {f"test/{d}/{m}": 0.5 + i / 100 + (m == "acc") / 1000 for i, d in enumerate(domains)
               for m in ("acc", "balanced_acc")}  # fmt: skip
    results = [dict(metrics) for _ in domains]  # Lightning repeats every metric under each dataloader
    results[0]["alpha"] = 1.2
    lines = results_table(results).splitlines()
    assert lines[0].split() == ["domain", "acc", "balanced_acc"] and len(lines) == 1 + 6 + 1
    assert lines[1].split() == ["rot0", "0.5010", "0.5000"] and lines[6].split() == ["rot75", "0.5510", "0.5500"]
    assert lines[-1] == "alpha: 1.2000"


def test_a_step_limited_fit_reads_epoch_n_not_n_of_minus_two(tmp_path: Path) -> None:
    from tests.modules import Regressor, data

    bar = EpochProgressBar()
    trainer = L.Trainer(max_steps=5, callbacks=[bar], logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Regressor(), data())
    assert trainer.max_epochs == -1  # what a step-limited fit runs under
    assert bar._get_train_description(1).strip() == "Epoch 1"  # Lightning's own bar: "Epoch 1/-2"
    capped = EpochProgressBar()
    L.Trainer(max_epochs=4, callbacks=[capped], logger=False, enable_checkpointing=False, limit_train_batches=1,
              default_root_dir=tmp_path).fit(Regressor(), data())  # fmt: skip
    assert capped._get_train_description(3).strip() == "Epoch 3/3"


def _cli(quick_base: Path, *extra: str) -> LightningScoreCLI:
    args = ["--config", str(RECIPES / "digits/expert.yaml"), f"--model.init_args.model_name={MODEL}",
            f"--model.init_args.pretrained={quick_base}", "--trainer.logger=false", *extra]  # fmt: skip
    return LightningScoreCLI(args=args, run=False)


def test_the_cli_trainer_gets_the_epoch_bar_unless_one_is_configured(quick_base: Path) -> None:
    assert type(_cli(quick_base).trainer.progress_bar_callback) is EpochProgressBar
    assert _cli(quick_base, "--trainer.enable_progress_bar=false").trainer.progress_bar_callback is None
    own = _cli(quick_base, "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar")
    assert type(own.trainer.progress_bar_callback) is RichProgressBar  # the user's own bar is kept


def test_quiet_library_noise_drops_only_the_noise(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency ...", stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("a warning about the run", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning about the run"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]...")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_merge_prints_one_line_with_the_options_and_one_table(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    tvs = ", ".join(str(expert_task_vectors[d]) for d in ("rot0", "rot60"))
    ours: list[str] = []  # lightning_score's own loggers (the merge engine's among them), whatever their handlers
    handler = logging.Handler()
    handler.emit = lambda record: ours.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_score").addHandler(handler)
    with caplog.at_level(logging.INFO):
        main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.init_args.model_name={MODEL}",
              f"--model.init_args.pretrained={quick_base}", f"--model.init_args.task_vectors=[{tvs}]",
              "--model.init_args.method_options={variant: diagonal}", "--data.train_domains=[rot0, rot60]",
              "--data.test_domains=[rot30, rot45]", "--trainer.enable_progress_bar=false"])  # fmt: skip
    logging.getLogger("lightning_score").removeHandler(handler)
    out = capsys.readouterr().out
    printed = [r.getMessage() for r in caplog.records] + ours
    merged = [line for line in printed if re.search(r"merged 2 task vectors", line, re.IGNORECASE)]
    assert len(merged) == 1 and "'score' (variant='diagonal', z=1.96, divide_by_tasks=True" in merged[0], printed
    assert not [line for line in printed if "💡 Tip" in line]
    assert not [w for w in recwarn if "LeafSpec" in str(w.message) or "tensorboardX" in str(w.message)]
    table = out[out.index("domain ") :].splitlines()[:3]
    assert [row.split()[0] for row in table] == ["domain", "rot30", "rot45"] and "test/rot30/acc" not in out


def test_dir_lists_the_public_names() -> None:
    names = dir(lightning_score)
    for public in ("CLIPExpert", "DomainDataModule", "MergeModule", "ScoreMergeCallback", "TaskVector",
                   "merge_task_vectors", "list_methods", "__version__"):  # fmt: skip
        assert public in names
    assert not {"Any", "annotations", "importlib"} & set(names)


def test_our_log_lines_follow_stderr_when_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's handler writes to the stderr of the moment: a closed earlier stream (pytest's capture, a
    redirected notebook cell) would otherwise print 'Logging error ... I/O operation on closed file'."""
    import io
    import logging
    import sys

    from lightning_score.cli.command import _show_our_info_logs

    _show_our_info_logs()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("lightning_score.probe").info("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("lightning_score.probe").info("two")
    assert second.getvalue() == "two\n"
