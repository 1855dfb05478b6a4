"""Run by tests: fit a small module with ScoreMergeCallback and checkpoints, to be killed at the end or resumed.

Usage:
    python resume_fit.py killed LIMIT OUTPUT_DIR
        Fit until LIMIT (``max_steps`` or ``max_epochs``), checkpointing the last step (or epoch); when training
        ends, before the callback writes τ, write ``OUTPUT_DIR/at-train-end`` and wait to be killed.
    python resume_fit.py resumed LIMIT OUTPUT_DIR
        Resume that fit from ``OUTPUT_DIR/ckpt/last.ckpt`` (new Trainer, new callback), then fit the same expert
        uninterrupted into ``OUTPUT_DIR/uninterrupted`` in this process (same thread count), for comparison.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import ScoreMergeCallback
from tests.modules import QUIET, Regressor, data

LIMITS = {"max_steps": {"max_steps": 8}, "max_epochs": {"max_epochs": 2}}  # 4 batches an epoch: 8 steps either way
CHECKPOINTS = {"max_steps": {"every_n_train_steps": 8}, "max_epochs": {"every_n_epochs": 1}}


class WaitToBeKilled(pl.Callback):
    """When training ends (before ScoreMergeCallback, listed after it, writes τ): say so, and wait."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marker.write_text(str(trainer.global_step))
        time.sleep(600)


def fit(limit: str, out: Path, callbacks: list[pl.Callback], ckpt_path: Path | None = None) -> None:
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, **CHECKPOINTS[limit])
    options = {**QUIET, "enable_checkpointing": True}
    trainer = pl.Trainer(default_root_dir=out, accelerator="cpu", devices=1, callbacks=[*callbacks, checkpoint],
                         **LIMITS[limit], **options)  # fmt: skip
    trainer.fit(Regressor(), data(), ckpt_path=ckpt_path)


def main() -> None:
    mode, limit, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    if mode == "killed":
        fit(limit, out, [WaitToBeKilled(out / "at-train-end"), ScoreMergeCallback(dirpath=out / "tv", name="x")])
    else:
        fit(limit, out, [ScoreMergeCallback(dirpath=out / "tv", name="x")], ckpt_path=out / "ckpt" / "last.ckpt")
        reference = out / "uninterrupted"
        fit(limit, reference, [ScoreMergeCallback(dirpath=reference / "tv", name="x")])


if __name__ == "__main__":
    main()
