"""Run by tests: MergeModule under DDP on 2 CPU processes (gloo), each rank merging half of the keys.

α is searched on the sources' validation data (grid 0.5, 1.0): each rank counts the images its image encoder
sees before the test starts, to show that the ranks split the search rather than repeat it.

Usage: python ddp_merge.py OUTPUT_DIR MODEL_NAME BASE_WEIGHTS METHOD TASK_VECTOR [TASK_VECTOR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_score import DomainDataModule, MergeModule


class CountSearchImages(pl.Callback):
    def __init__(self) -> None:
        self.images = 0
        self.testing = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def count(module: torch.nn.Module, args: tuple) -> None:
            if not self.testing:
                self.images += len(args[0])

        pl_module.image_encoder.register_forward_pre_hook(count)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.testing = True


def main() -> None:
    out, model_name, base, method, *task_vectors = sys.argv[1:]
    torch.set_num_threads(1)
    module = MergeModule(model_name, base, task_vectors=task_vectors, method=method, templates="digits", alpha="auto",
                         alpha_grid=[0.5, 1.0])  # fmt: skip
    data = DomainDataModule("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0)
    counter = CountSearchImages()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[counter])  # fmt: skip
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    rank = trainer.global_rank
    module.merged.save(Path(out) / f"merged-rank{rank}.safetensors")
    record = {
        "images": counter.images,
        "alpha_search": module.alpha_search_result.to_dict(),
        "val_images": len(data.val_dataloader().dataset),
    }
    torch.save(record, Path(out) / f"search-rank{rank}.pt")
    if trainer.is_global_zero:
        torch.save(results, Path(out) / "results.pt")


if __name__ == "__main__":
    main()
