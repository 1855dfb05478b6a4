"""Run by tests: MergeModule's checks before the work, under DDP on 2 CPU processes (gloo), each rank recording.

Cases, in this order on both ranks (each a fresh module and Trainer; a case that fails leaves the ranks in step):

* ``one``: α search on one validation image: rank 1's share is empty, which is no error (the counts are summed).
* ``empty``: every source's validation loader is empty: refused before the merge, on every rank.
* ``stream``: the loaders are of unknown length and yield nothing: refused after the first α pass, on every rank.
* ``output``: the merged output lies under a regular file: rank zero's check stops every rank, before the merge.

Each rank writes ``<case>-rank<r>.json``: the error it stopped with (or null), and whether it had merged.

Usage: python ddp_checks.py OUTPUT_DIR MODEL_NAME BASE_WEIGHTS TV_ROT0 TV_ROT60
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_score import DomainDataModule, MergeModule


class _NoImages(IterableDataset):
    def __iter__(self) -> Any:
        return iter(())


class CaseData(DomainDataModule):
    """The digits, with the case's validation loaders."""

    def __init__(self, case: str) -> None:
        super().__init__("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0)
        self.case = case

    def val_dataloader(self) -> Any:
        if self.case == "one":
            return DataLoader(Subset(self.dataset("rot0", "val"), [0]), batch_size=8)
        if self.case == "empty":
            return [DataLoader(Subset(self.dataset(d, "val"), []), batch_size=8) for d in self.train_domains]
        if self.case == "stream":
            return [DataLoader(_NoImages(), batch_size=8) for _ in self.train_domains]
        return super().val_dataloader()


def main() -> None:
    out, model_name, base, *task_vectors = sys.argv[1:]
    torch.set_num_threads(1)
    for case in ("one", "empty", "stream", "output"):
        module = MergeModule(model_name, base, task_vectors=task_vectors, method="task_arithmetic", alpha="auto",
                             alpha_grid=[0.5, 1.0], templates="digits")  # fmt: skip
        if case == "output":
            module.merged_output = Path(out) / "a-file" / "merged.safetensors"
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        try:
            trainer.test(module, datamodule=CaseData(case), verbose=False)
            error = None
        except Exception as exception:  # what each rank stopped with is what the test checks
            error = f"{type(exception).__name__}: {exception}"
        record = {"error": error, "merged": module.merged is not None, "selected": None}
        if module.alpha_search_result is not None:
            record["selected"] = module.alpha_search_result.selected
        (Path(out) / f"{case}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
