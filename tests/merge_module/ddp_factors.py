"""Run by tests: two merges sharing one FactorCache under a 2-process CPU strategy (gloo), as a study does.

Each rank saves the merged τ* it tested, per target, so the test can compare them with a merge that uses no cache.
The cache is built before the Trainer: under ``ddp`` every rank re-runs this script and keeps its own cache across
both merges; under ``ddp_spawn`` each test pickles the module, cache included, into fresh processes.

Usage: python ddp_factors.py OUTPUT_DIR STRATEGY MODEL_NAME BASE_WEIGHTS TV_ROT0 TV_ROT30 TV_ROT60
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_score import DomainDataModule, MergeModule
from lightning_score.merging import FactorCache


class SaveMerged(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.merged.save(Path(self.path.format(rank=trainer.global_rank)))


def main() -> None:
    out, strategy, model_name, base, *paths = sys.argv[1:]
    experts = dict(zip(("rot0", "rot30", "rot60"), paths, strict=True))
    torch.set_num_threads(1)
    cache = FactorCache(min_tasks=1)
    for target in ("rot60", "rot30"):  # the two folds share the rot0 expert
        sources = [d for d in experts if d != target]
        module = MergeModule(model_name, base, task_vectors=[experts[d] for d in sources], templates="digits",
                             factors=cache)  # fmt: skip
        data = DomainDataModule("builtin:digits", train_domains=sources, test_domains=[target], num_workers=0)
        save = SaveMerged(str(Path(out) / f"{target}-rank{{rank}}.safetensors"))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[save])  # fmt: skip
        trainer.test(module, datamodule=data, verbose=False)


if __name__ == "__main__":
    main()
