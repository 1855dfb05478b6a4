"""Run by tests: multi-process scenarios on 2 CPU processes (gloo), through Lightning's own launchers.

Usage: python ddp_scenarios.py SCENARIO OUTPUT_DIR [ARGS...]

* ``spawn_merge``: ``ddp_spawn`` fit with ``merge_with``, then ``trainer.test`` in the main process; it records
  what the callback says and what the module holds during the test.
* ``rank_zero_error STRATEGY``: a ``merge_with`` expert of another base, found on rank zero only; every rank
  writes the error it stops with to ``rank<r>.err``.
* ``test_after_fit MODEL BASE TV...``: a DDP fit, then a single-device ``Trainer.test`` of a MergeModule on
  rank zero only (the other rank has finished).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import ScoreMergeCallback, TaskVector
from tests.modules import QUIET, Regressor, data, head_state


class Spy(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.is_global_zero:
            torch.save(head_state(pl_module), self.out / "seen_during_test.pt")


class ErrorWriter(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        (self.out / f"rank{trainer.global_rank}.err").write_text(f"{type(exception).__name__}: {exception}")


def _ddp(strategy: str, callbacks: list, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, callbacks=callbacks,
                      **{**QUIET, **kwargs})  # fmt: skip


def spawn_merge(out: Path) -> None:
    first = ScoreMergeCallback(dirpath=out, name="a")
    pl.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[first], **QUIET).fit(Regressor(), data())
    callback = ScoreMergeCallback(dirpath=out, name="b", merge_with=[out / "a.safetensors"], method="average")
    model = Regressor()
    torch.save(head_state(model), out / "pretrained.pt")
    trainer = _ddp("ddp_spawn", [callback], default_root_dir=out)
    trainer.fit(model, data())
    torch.save(
        {
            "task_vector": str(callback.task_vector_path),
            "merged": str(callback.merged_path),
            "expert": head_state(model),
        },
        out / "main_process.pt",
    )
    tester = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback, Spy(out)], **QUIET)
    tester.test(model, data(), verbose=False)  # in the main process, which the fit's workers have left
    torch.save(head_state(model), out / "after_test.pt")


def rank_zero_error(out: Path, strategy: str) -> None:
    foreign = TaskVector({"head.0.weight": torch.zeros(6, 8)}, {"base_fingerprint": "blake2b:0000"})
    foreign.save(out / "foreign.safetensors")
    callback = ScoreMergeCallback(dirpath=out, merge_with=[out / "foreign.safetensors"])
    _ddp(strategy, [callback, ErrorWriter(out)], default_root_dir=out).fit(Regressor(), data())


def test_after_fit(out: Path, model_name: str, base: str, *task_vectors: str) -> None:
    from lightning_score import DomainDataModule, MergeModule

    trainer = _ddp("ddp", [], default_root_dir=out)
    trainer.fit(Regressor(), data())
    if trainer.is_global_zero:  # the other rank is done: nothing may wait for it
        module = MergeModule(model_name, base, task_vectors=list(task_vectors), method="score", templates="digits",
                             classnames=[str(i) for i in range(10)])  # fmt: skip
        dm = DomainDataModule("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0,
                              val_transform=module.val_transform)  # fmt: skip
        dm.setup("test")  # (given as loaders: Lightning's own prepare_data barrier would wait for every process)
        single = pl.Trainer(accelerator="cpu", devices=1, **QUIET)
        results = single.test(module, dataloaders=dm.test_dataloader(), verbose=False)[0]
        module.merged.save(out / "merged.safetensors")
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, output, *rest = sys.argv[1:]
    {"spawn_merge": spawn_merge, "rank_zero_error": rank_zero_error, "test_after_fit": test_after_fit}[scenario](
        Path(output), *rest
    )
