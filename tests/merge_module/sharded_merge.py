"""Run by tests: MergeModule under FSDP1 and FSDP2 on 2 CPU processes (gloo), through Lightning's own launcher.

Usage: python sharded_merge.py OUTPUT_DIR MODEL_NAME BASE_WEIGHTS TASK_VECTOR [TASK_VECTOR ...]

One pair of processes tests the SCORE merge (α searched on the sources' validation data, grid 0.5, 1.0) under
``tests.sharding.CPUFSDPStrategy`` (FSDP1, auto-wrapped per residual block; test only, see there) and then under the
real ``ModelParallelStrategy`` (FSDP2, ``MergeModule.configure_model`` shards per residual block). Each rank saves
τ*, the chosen α, whether the image encoder was sharded during the test, and the logits of the test images it saw
(``<kind>-rank<r>.pt``); rank zero saves the image encoder's weights during the test, gathered. Then
``use_alpha(0.25)`` loads another α into the sharded module: rank zero saves it, gathered, and under FSDP2 the test
runs again (``<kind>-alpha-rank<r>.pt``).
:func:`single_process` computes the same on one process, for the comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import DomainDataModule, MergeModule
from lightning_score.utilities.strategies import gather_full_state, is_sharded, sharding_root
from tests.experts import QUIET
from tests.sharding import CPUFSDPStrategy, model_parallel

GRID = [0.5, 1.0]


class Logits(pl.Callback):
    """Every test image's logits, in the order this rank saw them; the image encoder's weights, gathered."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.sharded = False
        self.weights: dict[str, torch.Tensor] = {}
        self.hooked = False

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logits, self.sharded = [], is_sharded(pl_module.image_encoder)
        if not self.hooked:
            self.hooked = True
            pl_module.head.register_forward_hook(
                lambda module, args, output: self.logits.append(output.detach().clone())
            )
        root = sharding_root(trainer.strategy, pl_module.image_encoder)
        if root is not None:
            full = gather_full_state(root)
            self.weights = {k.removeprefix("clip.visual."): v for k, v in full.items() if k.startswith("clip.visual.")}


def datamodule() -> DomainDataModule:
    return DomainDataModule("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0,
                            batch_size=64)  # fmt: skip


def module(model_name: str, base: str, task_vectors: list[str]) -> MergeModule:
    return MergeModule(model_name, base, task_vectors=task_vectors, method="score", templates="digits", alpha="auto",
                       alpha_grid=GRID)  # fmt: skip


def record(merge: MergeModule, spy: Logits) -> dict[str, Any]:
    return {"merged": dict(merge.merged), "alpha": merge.current_alpha, "logits": torch.cat(spy.logits) if spy.logits else None,
            "sharded": spy.sharded, "weights": spy.weights}  # fmt: skip


def single_process(model_name: str, base: str, task_vectors: list[str]) -> dict[str, Any]:
    """The same merge and tests on one process (run it with the ranks' thread count: tests.processes)."""
    merge, spy = module(model_name, base, task_vectors), Logits()
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[spy], **QUIET)
    trainer.test(merge, datamodule=datamodule(), verbose=False)
    first = record(merge, spy)
    merge.use_alpha(0.25)
    trainer.test(merge, datamodule=datamodule(), verbose=False)
    first["weights"] = {k: v.clone() for k, v in merge.merged_weights(first["alpha"]).items()}
    return {"first": first, "alpha": torch.cat(spy.logits), "alpha_weights": merge.merged_weights(0.25)}


def main() -> None:
    out, model_name, base, *task_vectors = sys.argv[1:]
    torch.set_num_threads(1)
    strategies = {"fsdp": CPUFSDPStrategy, "fsdp2": model_parallel}  # FSDP1: MergeModule sets the wrap policy
    for kind, make in strategies.items():
        merge, spy = module(model_name, base, task_vectors), Logits()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=make(), callbacks=[spy], **QUIET)
        trainer.test(merge, datamodule=datamodule(), verbose=False)
        torch.save(record(merge, spy), Path(out) / f"{kind}-rank{trainer.global_rank}.pt")
        merge.use_alpha(0.25)  # into the sharded module: each rank keeps its shard
        spy.on_test_start(trainer, merge)  # gather what it holds now
        if kind == "fsdp2":  # (FSDP1 cannot wrap a module twice: Lightning keeps its inner units, loses the root)
            trainer.test(merge, datamodule=datamodule(), verbose=False)
        torch.save(record(merge, spy), Path(out) / f"{kind}-alpha-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
