"""ScoreMergeCallback: snapshot the pre-trained weights before fitting, write the task vector when training ends.

A sibling of Lightning's ``WeightAveraging`` callbacks: settings in ``__init__``, what to snapshot chosen once in
``setup`` through one override point (:meth:`ScoreMergeCallback.select_module`) and kept as a :class:`.Selection`,
rank-zero work whose outcome every rank learns, and a ``state_dict()`` holding only what a resumed fit needs.
``merge_with``'s steps are in :mod:`.merge_with`; the FSDP gathers (θ₀, θ_T, the test-time swap) in :mod:`.sharded`.

When, exactly (Lightning 2.6's order of events in ``Trainer.fit``):

1. ``setup``: the module is still as the user built it, before the strategy converts it to the training
   precision (``*-true``) and moves it to its device. θ₀ is written here, in the weights' own precision,
   once, to ``<folder>/pretrained/<fingerprint>.safetensors`` (:mod:`lightning_score.callback.snapshot`). No
   process keeps θ₀ in memory; a checkpoint records only the file's path and fingerprint.
2. ``on_fit_start``: a resumed fit takes θ₀ from the checkpoint's record instead (and refuses to resume
   without one); a fresh fit checks that the module still holds the snapshot (up to the precision
   conversion). Lazy modules (``nn.Lazy*``) are snapshotted at the first backward, once materialised.
3. ``on_train_end``: τ = θ_T − θ₀ is written while the module is still on its device (Lightning moves it
   back to CPU before ``on_fit_end``), and the optional ``merge_with`` merge runs there too. A fit resumed
   from a checkpoint of its very end skips ``on_train_end``: ``on_fit_end`` writes τ then, from the same weights.
4. ``on_test_start`` / ``on_test_end``: with ``merge_with``, the merged weights are swapped in for
   ``trainer.test`` and the expert's weights restored afterwards, in any process: under ``ddp_spawn`` the
   fit ran in worker processes, so the files are found again from a small receipt rank zero writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from lightning_score.callback.merge_with import check_experts, check_same_base, find_merge, swap_in
from lightning_score.callback.outputs import check_overwrite, write_outputs
from lightning_score.callback.receipts import Receipt
from lightning_score.callback.records import (
    Selection,
    Snapshot,
    check_metadata,
    choose_submodule,
    compare_with_snapshot,
    expected_fingerprint,
    restored_snapshot,
    task_vector_metadata,
)
from lightning_score.callback.sharded import current_state, restore_own
from lightning_score.callback.snapshot import read_snapshot, write_snapshot
from lightning_score.merging import get_method
from lightning_score.utilities.ranks import on_rank_zero
from lightning_score.utilities.strategies import check_strategy

__all__ = ["ScoreMergeCallback"]


class ScoreMergeCallback(Callback):
    """Write the expert's task vector τ = θ_fine-tuned − θ_pre-trained when training ends.

    Attach it to any ``Trainer`` (single device, DDP or FSDP, any precision; see ``docs/strategies.md``). By
    default it snapshots the module's ``image_encoder`` (what :class:`~lightning_score.CLIPExpert`
    fine-tunes) or, for any other LightningModule, every parameter that requires a gradient. Task-vector
    keys are relative to that submodule (``torch.compile``'s ``_orig_mod.`` removed).

    Args:
        dirpath: Folder of the task vector; default ``<trainer.default_root_dir>/task_vectors``. θ₀ is kept
            once in its ``pretrained/`` subfolder.
        filename: File name; default ``<name>.safetensors``.
        module: Attribute path of the submodule to snapshot (e.g. ``"model.visual"``); default
            ``"image_encoder"`` when the module has one, else the whole module's trainable parameters.
        name: The expert's name in the task vector's metadata; default its domain (the datamodule's single
            training domain) or the module's class name.
        domain: The expert's domain; default the datamodule's single training domain, if it has one.
        merge_with: Task-vector files of earlier experts (same pre-trained weights). When given, the new
            expert is merged with them when training ends and the merged weights are used while
            ``trainer.test`` runs, then the expert's own weights are restored.
        method: Merge method for ``merge_with`` (see :func:`lightning_score.merging.list_methods`).
        alpha: Scaling coefficient α of the merged update.
        merge_options: Options of the merge method (e.g. ``{"variant": "diagonal"}``).
        metadata: More provenance for the task vector's metadata (JSON-serialisable), e.g. the settings a
            sweep compares when it decides whether a kept expert can be reused.
        overwrite: Replace a task vector that another fit wrote at the same file. Without it such a fit is
            refused when it starts, naming the file; the same fit run again or resumed (same provenance) may
            always replace its own. Under ``trainer.fast_dev_run`` nothing is written at all.
        adapters: For a PEFT-LoRA module: ``"factors"`` (default) writes each adapted weight's update as the
            adapters' factors s·B·A, exactly, and the SVD methods merge them through the factors; ``"merged"``
            writes ``merge_and_unload()``'s weights minus θ₀ (rounded to the weight's dtype, bit for bit).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[ScoreMergeCallback(dirpath="task_vectors")])
        trainer.fit(expert, datamodule)  # writes task_vectors/<domain>.safetensors
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        module: str | None = None,
        name: str | None = None,
        domain: str | None = None,
        merge_with: Sequence[str | Path] | None = None,
        method: str = "score",
        alpha: float = 1.0,
        merge_options: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        adapters: str = "factors",
    ) -> None:
        super().__init__()
        if adapters not in ("factors", "merged"):
            raise ValueError(f"ScoreMergeCallback: adapters={adapters!r}; choose 'factors' or 'merged'.")
        self.adapters = adapters
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.module = module
        self.name = name
        self.domain = domain
        self.merge_with = [Path(p) for p in merge_with or []]
        self.method = method
        self.alpha = alpha
        self.merge_options = dict(merge_options or {})
        self.metadata = check_metadata(metadata)
        self.overwrite = overwrite
        if self.merge_with:
            get_method(method).resolve_options(self.merge_options)  # an unknown method/option fails now
        self._receipt = Receipt(uuid.uuid4().hex)  # travels with the callback to spawned workers
        self._selection: Selection | None = None  # what is snapshotted, chosen in setup (fit; test with merge_with)
        self._snapshot: Snapshot | None = None  # θ₀ of the fit in progress (or the last one)
        self._restored: Snapshot | None = None  # set by load_state_dict while this fit restores a checkpoint
        self._deferred = False  # lazy parameters: snapshot at the first backward
        self._outputs: dict[str, Any] | None = None  # what the last fit wrote (this process)
        self._expert_state: dict[str, Tensor] | None = None
        self._device: torch.device | None = None  # the training device, noted when fitting starts
        self._idle = False  # trainer.fast_dev_run: this fit writes nothing

    @property
    @override
    def state_key(self) -> str:
        """Distinct per snapshotted submodule, stable across a resume even when the output folder changes."""
        return f"{type(self).__qualname__}{{'module': {self.module!r}}}"

    @property
    def task_vector_path(self) -> Path | None:
        """The task vector the last fit wrote (also in the main process of ``ddp_spawn``), else None."""
        outputs = self._recorded()
        return Path(outputs["task_vector"]) if outputs else None

    @property
    def merged_path(self) -> Path | None:
        """The merged task vector of the last fit with ``merge_with``, else None."""
        outputs = self._recorded()
        return Path(outputs["merged"]) if outputs and outputs.get("merged") else None

    # --- the override point -----------------------------------------------------------------------

    def select_module(self, pl_module: pl.LightningModule) -> tuple[nn.Module, list[str] | None]:
        """Choose what to snapshot: ``(submodule, keys or None for all its floating-point entries)``.

        Override to snapshot something else; the submodule's state-dict prefix is found by identity. The
        default follows ``module``; without it, the module's ``image_encoder`` if it has one, else the whole
        module restricted to parameters that require grad.
        """
        return choose_submodule(pl_module, self.module)

    def _select(self, pl_module: pl.LightningModule) -> Selection:
        return Selection.of(pl_module, *self.select_module(pl_module))

    def _follow(self, pl_module: pl.LightningModule) -> Selection:
        """The selection kept since ``setup``, made again if ``configure_model`` replaced its submodule."""
        if self._selection is None or not self._selection.belongs_to(pl_module):
            self._selection = self._select(pl_module)
        return self._selection

    def _state(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The selected weights now: the live tensors, or (sharded: a collective) the full ones on rank zero."""
        if self._selection is None:
            raise RuntimeError("ScoreMergeCallback: no module is selected yet (`setup` selects it).")
        return current_state(trainer, self._selection)

    # --- fit ---------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse unsupported strategies, check ``merge_with``, select what to snapshot and snapshot θ₀ (fit)."""
        if stage != "fit":
            if self.merge_with and stage == "test":
                check_strategy(trainer.strategy, "ScoreMergeCallback")
                self._selection = self._select(pl_module)
            return
        check_strategy(trainer.strategy, "ScoreMergeCallback")
        self._snapshot, self._restored, self._deferred, self._outputs = None, None, False, None
        on_rank_zero(trainer.strategy, self._receipt.forget)
        self._idle = bool(trainer.fast_dev_run)
        if self._idle:
            rank_zero_info("ScoreMergeCallback: fast_dev_run: no θ₀ snapshot, task vector or merge is written.")
            return
        if self.merge_with:  # FileNotFoundError / ValueError naming the file and the fix, before any training
            on_rank_zero(trainer.strategy, lambda: check_experts(self.merge_with))
        self._selection = self._select(pl_module)
        if any(is_lazy(value) for value in self._state(trainer).values()):
            self._deferred = True
            rank_zero_info("ScoreMergeCallback: lazy parameters; θ₀ is snapshotted once they are materialised.")
            return
        self._snapshot = self._take_snapshot(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed fit takes θ₀ from the checkpoint; a fresh one checks the module still holds the snapshot."""
        if self._idle:
            return
        self._follow(pl_module)
        self._device = pl_module.device  # the training device (a resumed fit may merge after teardown)
        if trainer.ckpt_path:  # θ₀ is the checkpoint's, lazy modules' included (never the resume point's weights)
            self._snapshot, self._deferred = self._resume_snapshot(trainer, pl_module), False
            rank_zero_info(f"ScoreMergeCallback: resuming; θ₀ is {self._snapshot.path} (from the checkpoint).")
            return
        if self._deferred or self._snapshot is None:
            return
        snapshot, state = self._snapshot, self._state(trainer)
        verdict = on_rank_zero(trainer.strategy, lambda: compare_with_snapshot(snapshot, state))
        if verdict == "changed":  # configure_model changed the weights, in their own precision: θ₀ is now
            self._snapshot = self._take_snapshot(trainer, pl_module)
        elif verdict == "changed and converted":
            raise ValueError(
                "ScoreMergeCallback: the weights to snapshot changed between `setup` and the start of fitting "
                "(in configure_model?) and the precision plugin converted them to lower precision, so θ₀ cannot be "
                "taken in the weights' own precision. Set the pre-trained weights in __init__ or setup, not "
                "configure_model, or fit in 32-true / *-mixed precision."
            )
        on_rank_zero(trainer.strategy, lambda: self._check_target(trainer, pl_module, self._snapshot))

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Lazy modules: snapshot θ₀ once materialised (the first forward), before the first optimiser step."""
        if self._deferred:  # (never under fast_dev_run: setup returned first)
            self._deferred = False
            self._snapshot = self._take_snapshot(trainer, pl_module)
            on_rank_zero(trainer.strategy, lambda: self._check_target(trainer, pl_module, self._snapshot))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write τ = θ − θ₀ (rank zero, atomically) and merge with ``merge_with``, on the module's device."""
        if not self._idle:  # the strategy has not torn down yet: the module is on its device
            self._write_task_vector(trainer, pl_module, pl_module.device)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write τ if a resumed fit ended without it, then forget the state restored from a checkpoint.

        Resumed from a checkpoint of its last step or epoch, a fit has nothing left to train and Lightning skips
        ``on_train_end``: τ is written here, from the same weights, merged on the training device.
        """
        if trainer.ckpt_path and self._outputs is None and self._snapshot is not None:
            rank_zero_info(
                f"ScoreMergeCallback: '{trainer.ckpt_path}' is the checkpoint of a finished fit (nothing left to "
                "train, so Lightning skipped on_train_end); writing its task vector now."
            )
            self._write_task_vector(trainer, pl_module, self._device or pl_module.device)
        self._restored = None

    # --- test: the merged weights in place ---------------------------------------------------------

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``merge_with``: swap the merged weights θ₀ + τ* in (raise if no fit produced a merge)."""
        if not self.merge_with:
            return
        outputs = on_rank_zero(trainer.strategy, lambda: find_merge(self._recorded(), self.merge_with))
        self._expert_state = swap_in(self._follow(pl_module), outputs, trainer)
        rank_zero_info("ScoreMergeCallback: testing the merged model; the expert's weights come back after the test.")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the expert's own weights after testing the merged ones."""
        if self._expert_state is None or self._selection is None:
            return
        restore_own(trainer, self._selection, self._expert_state)
        self._expert_state = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Never leave the merged weights in the module, nor a checkpoint's θ₀ for the next fit."""
        self._restored = None
        self.on_test_end(trainer, pl_module)

    # --- checkpointing ----------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where θ₀ is (the snapshot file and its fingerprint), so a resumed fit still subtracts θ₀."""
        if self._snapshot is None:
            return {}
        return {
            "module": self._snapshot.module,
            "pretrained_path": str(self._snapshot.path),
            "pretrained_fingerprint": self._snapshot.fingerprint,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore where θ₀ is, for the fit resuming from this checkpoint (checked in ``on_fit_start``)."""
        if "pretrained" in state_dict:
            raise ValueError(
                "This checkpoint keeps θ₀ inside it, as an earlier lightning-score did; this version keeps θ₀ in a "
                "file beside the task vectors. Finish that fit with the earlier version, or start afresh."
            )
        if state_dict.get("pretrained_path"):
            self._restored = Snapshot(
                state_dict["module"], Path(state_dict["pretrained_path"]), state_dict["pretrained_fingerprint"]
            )

    # --- helpers ----------------------------------------------------------------------------------

    def _folder(self, trainer: pl.Trainer) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "task_vectors"

    def _target(self, trainer: pl.Trainer, metadata: dict[str, Any]) -> Path:  # <folder>/<filename or name>
        return self._folder(trainer) / (self.filename or f"{metadata['name']}.safetensors")

    def _check_target(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: Snapshot) -> None:
        """Before any training (rank zero): refuse a fit that would replace another fit's task vector."""
        metadata = task_vector_metadata(trainer, pl_module, self.name, self.domain, snapshot.module, self.metadata)
        check_overwrite(self._target(trainer, metadata), metadata, snapshot.fingerprint, self.overwrite)

    def _write_task_vector(self, trainer: pl.Trainer, pl_module: pl.LightningModule, device: torch.device) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError(
                "ScoreMergeCallback: training ended before θ₀ was snapshotted (no training step ran, and the module "
                "has lazy parameters), so there is no task vector to write."
            )
        state = self._state(trainer)
        factors = self._selection.live_factors() if self._selection and self.adapters == "factors" else {}
        metadata = task_vector_metadata(trainer, pl_module, self.name, self.domain, snapshot.module, self.metadata)
        path, merge = self._target(trainer, metadata), (self.merge_with, self.method, self.alpha, self.merge_options)

        def write() -> dict[str, Any]:
            return write_outputs(snapshot, state, metadata, path, merge, self._receipt, device, self.overwrite, factors)

        self._outputs = on_rank_zero(trainer.strategy, write)

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot:
        selection, state, folder = self._follow(pl_module), self._state(trainer), self._folder(trainer)

        def write() -> tuple[str, str]:
            path, fingerprint = write_snapshot(state, folder)
            check_same_base(self.merge_with, fingerprint, getattr(pl_module, "base_model", None))
            return str(path), fingerprint

        path, fingerprint = on_rank_zero(trainer.strategy, write)
        expected = expected_fingerprint(pl_module, selection.submodule)
        if expected is not None and expected != fingerprint:
            rank_zero_warn(
                f"ScoreMergeCallback: {type(pl_module).__name__}.image_encoder no longer holds the pre-trained "
                "weights it was built with when fitting starts, so the task vector is measured from these weights "
                "and will not merge with experts of the original base."
            )
        return Snapshot(selection.prefix, Path(path), fingerprint)

    def _resume_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Snapshot:
        selection = self._follow(pl_module)
        restored = restored_snapshot(self._restored, selection.prefix, trainer.ckpt_path, self.state_key)
        expected = expected_fingerprint(pl_module, selection.submodule)

        def check() -> None:
            read_snapshot(restored.path, restored.fingerprint, verify=True)
            if expected is not None and expected != restored.fingerprint:
                raise ValueError(
                    f"ScoreMergeCallback: the checkpoint's θ₀ ({restored.path}) is not the pre-trained weights of "
                    f"{type(pl_module).__name__} ({expected[:20]}… vs {restored.fingerprint[:20]}…): the checkpoint "
                    "comes from a fit of another base model."
                )
            check_same_base(self.merge_with, restored.fingerprint, getattr(pl_module, "base_model", None))
            self._check_target(trainer, pl_module, restored)

        on_rank_zero(trainer.strategy, check)
        return restored

    def _recorded(self) -> dict[str, Any] | None:
        """What the last fit wrote: this process's record, else the receipt (the main process of ``ddp_spawn``)."""
        return self._outputs or self._receipt.read()
