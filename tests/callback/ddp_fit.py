"""Run by tests: fit a small module with DDP on 2 CPU processes (gloo) and ScoreMergeCallback attached.

Usage: python ddp_fit.py OUTPUT_DIR. Lightning's own launcher starts the second process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import ScoreMergeCallback
from tests.modules import Regressor


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    model = Regressor()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "pretrained.pt")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[ScoreMergeCallback(dirpath=out / "task_vectors", name="ddp")],
    )  # fmt: skip
    trainer.fit(model, data)
    if trainer.is_global_zero:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "finetuned.pt")
    # every rank ends with the same weights (DDP keeps them in sync); record each rank's for the test
    torch.save(model.state_dict(), out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
