"""Run by tests: ScoreMergeCallback under FSDP1, FSDP2 and a tensor-parallel plan on 2 CPU processes (gloo).

Usage: python sharded_fit.py fits OUTPUT_DIR | error KIND OUTPUT_DIR | expert OUTPUT_DIR MODEL_NAME BASE_WEIGHTS

* ``fits``: one pair of processes runs, one Trainer after another (the process group is kept): a DDP fit (the
  reference), FSDP1 (``use_orig_params=True``, with ``merge_with`` and a test of the merge), FSDP1 with flat
  parameters and activation checkpointing (and once more with a merge, whose test is refused:
  ``flat_merge/test_refused-rank<r>.txt``), FSDP2 (with ``merge_with`` and a test), a tensor-parallel plan
  (``tp``: ``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)``, with ``merge_with`` and a test;
  both ranks see every batch, so its batches are twice DDP's: the same samples per step), ``torch.compile`` after
  sharding (``fsdp2_compiled``: in place, as CLIPExpert; ``fsdp2_wrapped``: ``torch.compile(module)``, whose keys
  gain ``_orig_mod.``; ``fsdp_compiled``: FSDP1, in place), and an FSDP1, an FSDP2 and a tensor-parallel fit
  stopped at step 2 and resumed from their sharded checkpoints. Each fit writes ``<name>/<name>.safetensors``;
  rank zero saves what the module held during each test and after it (``<name>/during_test.pt``, ``after_test.pt``),
  the weights each fit ended with (``<name>/finetuned.pt``), all gathered, and for a compiled fit how many graphs
  dynamo compiled and the parameters' names (``<name>/compiled.pt``). The compiled fits use inductor, the default
  backend (it needs a C++ compiler; ~30 s the first time on 2 loaded CPU cores, then its cache).
* ``expert``: a CLIPExpert fitted 2 steps under DDP, FSDP1 and FSDP2, with nothing but the strategy changed
  (CLIPExpert shards itself per residual block); each writes ``<kind>/<kind>.safetensors`` and, on rank zero, how
  many FSDP units its image encoder had (``<kind>/units.pt``).
* ``error KIND``: a fit under ``KIND`` whose task-vector file another fit takes on rank zero only, as training
  ends: rank zero's write is refused, and every rank must stop with that error (``rank<r>.err``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import ScoreMergeCallback, TaskVector
from lightning_score.utilities.strategies import gather_full_state, sharding_root
from tests.modules import QUIET, data
from tests.sharding import CPUFSDPStrategy, ShardedRegressor, TensorParallelRegressor, model_parallel, strategy

STEPS = 4


def gathered(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The head's weights (``head.``-relative keys), gathered when sharded; every rank must call it."""
    root = sharding_root(trainer.strategy, module)
    state = gather_full_state(root) if root is not None else module.state_dict()
    return {k.removeprefix("head."): v.detach().clone().cpu() for k, v in state.items() if k.startswith("head.")}


class Spy(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        state = gathered(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save(state, self.folder / "during_test.pt")


def fit(out: Path, name: str, kind: str, steps: int = STEPS, merge_with: list[Path] | None = None,
        ckpt_path: Path | None = None, test: bool = False, save: bool = False, compile: str | None = None,
        backend: str = "aot_eager", **strategy_options: object) -> pl.Trainer:  # fmt: skip
    folder = out / name
    folder.mkdir(exist_ok=True)
    callback = ScoreMergeCallback(dirpath=folder, name=name, merge_with=merge_with, method="average")
    checkpoints = (
        [ModelCheckpoint(dirpath=folder / "checkpoints", every_n_train_steps=2, save_top_k=-1)] if save else []
    )
    # image_encoder (prefix "head"), or the whole module; under "tp" every rank sees every batch: twice as large
    make = TensorParallelRegressor if kind == "tp" else ShardedRegressor
    model = make(encoder_attr=name != "fsdp_flat", compile=compile, backend=backend)
    batch_size = 32 if kind == "tp" else 16
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(kind, **strategy_options), max_steps=steps,
                         callbacks=[callback, *checkpoints, Spy(folder)], default_root_dir=folder,
                         **{**QUIET, "enable_checkpointing": save})  # fmt: skip
    if compile is not None:
        torch._dynamo.reset()  # compiled afresh, not from an earlier fit's cache: the graphs are counted
    graphs = counters["stats"]["unique_graphs"]
    trainer.fit(model, data(batch_size=batch_size), ckpt_path=ckpt_path)
    final = gathered(trainer, model)
    if trainer.is_global_zero:
        torch.save(final, folder / "finetuned.pt")
        if compile is not None:  # the graphs dynamo made, and the parameters' names (no collective, unlike state_dict)
            names = [name for name, _ in model.named_parameters() if name.startswith("head.")]
            torch.save({"graphs": counters["stats"]["unique_graphs"] - graphs, "names": names}, folder / "compiled.pt")
    if test:
        trainer.test(model, data(batch_size=batch_size), verbose=False)
        after = gathered(trainer, model)
        if trainer.is_global_zero:
            torch.save(after, folder / "after_test.pt")
    return trainer


def fits(out: Path) -> None:
    fit(out, "ddp", "ddp")
    reference = [out / "ddp" / "ddp.safetensors"]
    fit(out, "fsdp", "fsdp", merge_with=reference, test=True)
    fit(out, "fsdp_flat", "fsdp_flat")
    try:  # flat parameters: the merge is written, but loading it into the module for the test is refused
        fit(out, "flat_merge", "fsdp_flat", merge_with=reference, test=True)
    except ValueError as refusal:  # on every rank, before any collective: both carry on
        rank = torch.distributed.get_rank()
        (out / "flat_merge" / f"test_refused-rank{rank}.txt").write_text(str(refusal))
    fit(out, "fsdp2", "fsdp2", merge_with=reference, test=True)
    fit(out, "tp", "tp", merge_with=reference, test=True)
    for name, kind, mode in (("fsdp2_compiled", "fsdp2", "in_place"), ("fsdp2_wrapped", "fsdp2", "wrapped"),
                             ("fsdp_compiled", "fsdp", "in_place")):  # fmt: skip
        fit(out, name, kind, compile=mode, backend="inductor")
    for kind, options in (("fsdp", {"state_dict_type": "sharded"}), ("fsdp2", {}), ("tp", {})):  # sharded checkpoints
        name = f"{kind}_resumed"
        fit(out, name, kind, steps=2, save=True, **options)
        checkpoint = out / name / "checkpoints" / "epoch=0-step=2.ckpt"
        fit(out, name, kind, ckpt_path=checkpoint, **options)


class TakeTheFile(pl.Callback):
    """On rank zero only, as training ends: another fit's task vector appears at this fit's file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            TaskVector({"0.weight": torch.zeros(6, 8)}, {"name": "someone else"}).save(self.path)


class ErrorWriter(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        (self.out / f"rank{trainer.global_rank}.err").write_text(f"{type(exception).__name__}: {exception}")


def error(kind: str, out: Path) -> None:
    callbacks = [TakeTheFile(out / "mine.safetensors"), ScoreMergeCallback(dirpath=out, name="mine"), ErrorWriter(out)]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy(kind), max_steps=2, callbacks=callbacks,
                         default_root_dir=out, **QUIET)  # fmt: skip
    make = TensorParallelRegressor if kind == "tp" else ShardedRegressor
    trainer.fit(make(encoder_attr=True), data())


class Units(pl.Callback):
    """On rank zero, when fitting starts: the FSDP units (FSDP1 wrappers or FSDP2 modules) in the image encoder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        units = [m for m in pl_module.image_encoder.modules() if isinstance(m, FSDPModule | FullyShardedDataParallel)]
        if trainer.is_global_zero:
            torch.save({"units": len(units), "blocks": len(pl_module.image_encoder.transformer.resblocks)},
                       self.folder / "units.pt")  # fmt: skip


def expert(out: Path, model_name: str, base: str) -> None:
    from lightning_score import CLIPExpert, DomainDataModule

    for kind in ("ddp", "fsdp", "fsdp2"):
        folder = out / kind
        folder.mkdir(exist_ok=True)
        pl.seed_everything(0, verbose=False)  # the same augmentations and shuffling in every fit
        model = CLIPExpert(model_name, base, templates="digits", lr=1e-3, warmup_steps=0)
        data = DomainDataModule("builtin:digits", train_domains=["rot0"], num_workers=0, batch_size=16)
        make = {"ddp": lambda: "ddp", "fsdp": CPUFSDPStrategy, "fsdp2": model_parallel}[kind]
        callbacks = [ScoreMergeCallback(dirpath=folder, name=kind), Units(folder)]
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=make(), max_steps=2, limit_val_batches=0,
                             callbacks=callbacks, **QUIET)  # fmt: skip
        trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "fits":
        fits(Path(sys.argv[2]))
    elif sys.argv[1] == "expert":
        expert(Path(sys.argv[2]), *sys.argv[3:])
    else:
        error(sys.argv[2], Path(sys.argv[3]))
