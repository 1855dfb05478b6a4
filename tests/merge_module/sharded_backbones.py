"""Run by tests: MergeModule of the transformers and timm backbones under FSDP2 on 2 CPU processes (gloo).

Usage: python sharded_backbones.py OUTPUT_DIR RUNS_JSON

``RUNS_JSON`` maps a backbone to ``{"base": MergeModule keyword arguments, "task_vectors": [...]}``. For each, a
pair of processes tests the TSV-M merge under the real ``ModelParallelStrategy`` (FSDP2: ``configure_model`` shards
each of the backbone's residual blocks, :meth:`Backbone.block_types`) and saves, per rank, whether the image encoder
was sharded during the test and the logits of the test images it saw (``<backbone>-rank<r>.pt``).
:func:`single_process` computes the same logits on one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import MergeModule
from tests.experts import QUIET
from tests.merge_module.sharded_merge import Logits, datamodule
from tests.sharding import model_parallel


def module(run: dict[str, Any]) -> MergeModule:
    return MergeModule(**run["base"], task_vectors=run["task_vectors"], method="tsv", templates="digits")


def single_process(run: dict[str, Any]) -> torch.Tensor:
    """The test logits of the same merge on one process (run it with the ranks' thread count: tests.processes)."""
    merge, spy = module(run), Logits()
    pl.Trainer(accelerator="cpu", devices=1, callbacks=[spy], **QUIET).test(
        merge, datamodule=datamodule(), verbose=False
    )
    return torch.cat(spy.logits)


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(1)
    for backbone, run in runs.items():
        merge, spy = module(run), Logits()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=model_parallel(), callbacks=[spy], **QUIET)
        trainer.test(merge, datamodule=datamodule(), verbose=False)
        record = {"sharded": spy.sharded, "logits": torch.cat(spy.logits)}
        torch.save(record, out / f"{backbone}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
