"""Run by tests: MergeModule under DDP on 2 CPU processes (gloo), each rank merging half of the keys.

Usage: python ddp_merge.py OUTPUT_DIR MODEL_NAME BASE_WEIGHTS METHOD TASK_VECTOR [TASK_VECTOR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_score import DomainDataModule, MergeModule


def main() -> None:
    out, model_name, base, method, *task_vectors = sys.argv[1:]
    torch.set_num_threads(1)
    module = MergeModule(model_name, base, task_vectors=task_vectors, method=method, templates="digits")
    data = DomainDataModule("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    module.merged.save(Path(out) / f"merged-rank{trainer.global_rank}.safetensors")
    if trainer.is_global_zero:
        torch.save(results, Path(out) / "results.pt")


if __name__ == "__main__":
    main()
