"""What ScoreMergeCallback keeps between the events of a fit (what it snapshots, where θ₀ is, what it wrote).

* :class:`Selection`: the submodule whose weights the task vector covers and the keys chosen, made once in
  ``setup``; :meth:`Selection.live_state` reads the live tensors whenever they are needed.
* :class:`Snapshot`: the submodule's state-dict prefix, the θ₀ file (:mod:`lightning_score.callback.snapshot`) and its
  fingerprint: all that a checkpoint carries.
* :class:`~lightning_score.callback.receipts.Receipt` (in :mod:`.receipts`, re-exported here): a small JSON file
  in a private folder of the temporary directory listing the files one callback instance's last fit wrote, for
  the main process of ``ddp_spawn``.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_score.callback.adapters import (
    adapted_keys,
    adapter_provenance,
    adapter_targets,
    effective_state,
    holds_adapters,
    low_rank_updates,
)
from lightning_score.callback.receipts import Receipt
from lightning_score.callback.snapshot import read_snapshot
from lightning_score.utilities.low_rank import LowRankUpdate
from lightning_score.utilities.strategies import unwrapped_key

__all__ = [
    "Receipt",
    "Selection",
    "Snapshot",
    "check_metadata",
    "choose_submodule",
    "clean_key",
    "compare_with_snapshot",
    "expected_fingerprint",
    "restored_snapshot",
    "state_prefix",
    "task_vector_metadata",
]


RESERVED_METADATA = frozenset(
    {
        "name",
        "module",
        "domain",
        "train_domains",
        "base_model",
        "base_fingerprint",
        "global_step",
        "precision",
        "adapters",
    }
)
"""The metadata fields :func:`task_vector_metadata` (and the snapshot's fingerprint) fill."""

_ARGUMENT_NAMES = frozenset({"cls", "pretrained", "finetuned", "keys"})  # TaskVector.from_state_dicts's own


def clean_key(key: str) -> str:
    """A state-dict key without the names that wrappers insert.

    ``torch.compile``'s ``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's
    ``_checkpoint_wrapped_module.``.

    Example:
        >>> clean_key("head._orig_mod.0.weight"), clean_key("_orig_mod.proj")
        ('head.0.weight', 'proj')
        >>> clean_key("_fsdp_wrapped_module.head.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight")
        'head.0.weight'
    """
    return unwrapped_key(key)


@dataclass(frozen=True)
class Selection:
    """What the task vector covers, chosen once (in ``setup``): a submodule and some of its state-dict entries.

    The tensors themselves are not kept: :meth:`live_state` reads them from the submodule when they are needed,
    since they change during fitting and lazy parameters are materialised, precision plugins convert and
    strategies move them after ``setup``.

    Attributes:
        submodule: The module whose state dict holds the weights.
        prefix: Its name in the LightningModule's state dict, ``_orig_mod.`` removed (``""`` for the module itself).
        keys: The selected entries, as the task vector names them (``_orig_mod.`` removed).
        raw_keys: The same entries as ``submodule.state_dict()`` named them when selected (same order).
        adapted: Whether the submodule holds PEFT adapters: then ``keys`` are the base model's weights the adapters
            update (:mod:`lightning_score.callback.adapters`), never the adapters' own parameters, and
            :meth:`live_state` computes those weights as ``merge_and_unload()`` would.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> selection = Selection.of(model, model[1])
        >>> selection.prefix, selection.keys  # floating-point entries only: num_batches_tracked is left out
        ('1', ('bias', 'running_mean', 'running_var', 'weight'))
        >>> selection.live_state()["weight"] is model[1].weight
        True
    """

    submodule: nn.Module
    prefix: str
    keys: tuple[str, ...]
    raw_keys: tuple[str, ...]
    adapted: bool = False

    @classmethod
    def of(cls, pl_module: nn.Module, submodule: nn.Module, keys: Sequence[str] | None = None) -> Selection:
        """Select ``keys`` of ``submodule`` (default: its floating-point entries, lazy ones included).

        Args:
            pl_module: The module being fitted; ``submodule`` must be part of it (its prefix is found by identity).
            submodule: The module whose weights the task vector covers.
            keys: Entries of ``submodule.state_dict()``; default every floating-point (or not yet materialised) one.

        Raises:
            ValueError: ``submodule`` is not part of ``pl_module``, a key is not one of its floating-point entries, or
                nothing is selected.
        """
        prefix = state_prefix(pl_module, submodule)
        if holds_adapters(submodule):
            return cls._of_adapted(submodule, prefix, keys)
        full = submodule.state_dict(keep_vars=True)
        if keys is None:
            chosen = [key for key, value in full.items() if is_lazy(value) or value.is_floating_point()]
        else:
            chosen = list(keys)
            for key in chosen:
                if key not in full:
                    raise ValueError(
                        f"ScoreMergeCallback.select_module chose '{key}', which {type(submodule).__name__} does not "
                        f"have (its state-dict keys are e.g. {sorted(full)[:3]}). Return keys of the submodule itself."
                    )
                if not (is_lazy(full[key]) or full[key].is_floating_point()):
                    raise ValueError(
                        f"ScoreMergeCallback.select_module chose '{key}', which is not floating point "
                        f"({full[key].dtype}): task vectors hold floating-point entries only. Leave it out."
                    )
        raw = {clean_key(key): key for key in sorted(chosen)}
        if not raw:
            raise ValueError(
                f"The module selected for the task vector ({type(submodule).__name__}) has no floating-point weights."
            )
        return cls(submodule, prefix, tuple(raw), tuple(raw.values()))

    @classmethod
    def _of_adapted(cls, submodule: nn.Module, prefix: str, keys: Sequence[str] | None) -> Selection:
        """The weights of a PEFT-adapted ``submodule``: ``keys`` (raw, adapters' included) become what they update."""
        weights = adapted_keys(submodule)  # base-model key -> raw key
        if keys is None:
            chosen = set(weights)
        else:
            targets, by_raw = adapter_targets(submodule), {raw: key for key, raw in weights.items()}
            chosen = set()
            for raw in keys:
                if raw in targets:
                    chosen.update(targets[raw])
                elif raw in by_raw:
                    chosen.add(by_raw[raw])
                else:
                    raise ValueError(
                        f"ScoreMergeCallback.select_module chose '{raw}', which is neither a weight nor an adapter "
                        f"parameter of {type(submodule).__name__} (e.g. {sorted(weights)[:3]})."
                    )
        raw = {clean_key(key): weights[key] for key in sorted(chosen)}
        if not raw:
            raise ValueError(
                f"The adapted module selected for the task vector ({type(submodule).__name__}) has no weights."
            )
        return cls(submodule, prefix, tuple(raw), tuple(raw.values()), adapted=True)

    def belongs_to(self, pl_module: nn.Module) -> bool:
        """Whether the submodule is still part of ``pl_module`` (not replaced, e.g. in ``configure_model``)."""
        return any(module is self.submodule for module in pl_module.modules())

    def live_state(self) -> dict[str, Tensor]:
        """The selected tensors as they are now, by task-vector key (the live objects: not detached, not copied).

        Raises:
            RuntimeError: An entry is gone from the submodule's state dict.
        """
        if self.adapted:  # computed weights (new tensors where an adapter changes them), by base-model key
            state = {clean_key(key): value for key, value in effective_state(self.submodule).items()}
            return {key: state[key] for key in self.keys}
        full = self.submodule.state_dict(keep_vars=True)
        if all(raw in full for raw in self.raw_keys):
            return {key: full[raw] for key, raw in zip(self.keys, self.raw_keys, strict=True)}
        by_key = {clean_key(raw): value for raw, value in full.items()}  # torch.compile wrapped a part since then
        missing = [key for key in self.keys if key not in by_key]
        if missing:
            raise RuntimeError(
                f"ScoreMergeCallback: the module's keys changed during fitting ({type(self.submodule).__name__} "
                f"no longer has e.g. {missing[:3]})."
            )
        return {key: by_key[key] for key in self.keys}

    def live_factors(self) -> dict[str, LowRankUpdate]:
        """The selected weights that LoRA adapters update, as their updates' factors (none for a plain module).

        See :func:`~lightning_score.callback.adapters.low_rank_updates`; the factors are the live parameters, detached.
        """
        if not self.adapted:
            return {}
        factors = {clean_key(key): update for key, update in low_rank_updates(self.submodule).items()}
        return {key: factors[key] for key in self.keys if key in factors}


@dataclass(frozen=True)
class Snapshot:
    """Where θ₀ of one fit is: the submodule's state-dict prefix, the snapshot file, its fingerprint."""

    module: str
    path: Path
    fingerprint: str


def restored_snapshot(restored: Snapshot | None, prefix: str, ckpt_path: str | None, state_key: str) -> Snapshot:
    """θ₀ of the fit being resumed, as its checkpoint recorded it, if it is of the submodule this fit snapshots.

    Args:
        restored: What the checkpoint held under ``state_key`` (None: nothing).
        prefix: The state-dict prefix of the submodule this fit snapshots.
        ckpt_path: The checkpoint, for the messages.
        state_key: The callback's state key, for the messages.

    Raises:
        ValueError: The checkpoint has no θ₀ for this callback, or one of another submodule.
    """
    if restored is None:
        raise ValueError(
            f"ScoreMergeCallback: resuming from '{ckpt_path}', which has no state under '{state_key}', so θ₀ (where "
            "this expert started) is unknown and the task vector would be measured from the resume point. Resume "
            "with the callback settings (module=...) used when the checkpoint was written; or, to measure from "
            "these weights, load them into the module and fit without ckpt_path."
        )
    if restored.module != prefix:
        raise ValueError(
            f"ScoreMergeCallback: the checkpoint's θ₀ is of '{restored.module}', but this fit snapshots "
            f"'{prefix}'. Resume with the same module selection."
        )
    return restored


def compare_with_snapshot(snapshot: Snapshot, state: dict[str, Tensor]) -> str:
    """Whether the live weights still are the snapshot, up to the precision conversion of the strategy.

    Returns:
        ``"same"``; ``"changed"`` (changed, in the snapshot's own dtypes); or ``"changed and converted"``.
    """
    pretrained = read_snapshot(snapshot.path, snapshot.fingerprint)
    changed = converted = False
    for key, live in state.items():
        base = pretrained[key]
        converted = converted or base.dtype != live.dtype
        changed = changed or not torch.equal(base.to(live.dtype).to(live.device), live.detach())
    if not changed:
        return "same"
    return "changed and converted" if converted else "changed"


def state_prefix(pl_module: nn.Module, submodule: nn.Module) -> str:
    """The submodule's name in the module's state dict (``clip.visual`` for ``image_encoder``, say)."""
    for name, candidate in pl_module.named_modules():
        if candidate is submodule:
            return clean_key(name + ".").rstrip(".") if name else ""
    raise ValueError(f"The selected {type(submodule).__name__} is not a submodule of {type(pl_module).__name__}.")


def expected_fingerprint(pl_module: nn.Module, submodule: nn.Module) -> str | None:
    """The module's own record of its pre-trained weights (CLIPExpert's), when ``submodule`` is what it describes."""
    fingerprint = getattr(pl_module, "pretrained_fingerprint", None)
    if isinstance(fingerprint, str) and getattr(pl_module, "image_encoder", None) is submodule:
        return fingerprint
    return None


def check_metadata(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Check the provenance given as ``ScoreMergeCallback(metadata=...)`` and return a copy of it.

    Raises:
        ValueError: A field is one the callback records itself (:data:`RESERVED_METADATA`) or an argument name of
            :meth:`~lightning_score.TaskVector.from_state_dicts`, or a value is not JSON-serialisable.

    Example:
        >>> check_metadata({"seed": 0})
        {'seed': 0}
        >>> check_metadata({"name": "art"})
        Traceback (most recent call last):
        ...
        ValueError: ScoreMergeCallback(metadata=...): ['name'] are recorded by the callback itself.
    """
    metadata = dict(extra or {})
    reserved = sorted(set(metadata) & RESERVED_METADATA)
    if reserved:
        raise ValueError(f"ScoreMergeCallback(metadata=...): {reserved} are recorded by the callback itself.")
    arguments = sorted(set(metadata) & _ARGUMENT_NAMES)
    if arguments:
        raise ValueError(
            f"ScoreMergeCallback(metadata=...): {arguments} are argument names of TaskVector.from_state_dicts, "
            "which records the metadata: rename them."
        )
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"ScoreMergeCallback(metadata=...) must be JSON-serialisable: {error}") from None
    return metadata


def task_vector_metadata(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    name: str | None,
    domain: str | None,
    prefix: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance written with a task vector: expert, domain(s), base model, step, precision, and ``extra``.

    Args:
        trainer: The fit's Trainer (its datamodule's ``train_domains``, step and precision are recorded).
        pl_module: The fitted module (its ``base_model`` label, when it has one, e.g. a CLIPExpert's).
        name: The expert's name; default its domain, else the module's class name.
        domain: Its domain; default the datamodule's single training domain.
        prefix: The snapshotted submodule's state-dict prefix.
        extra: More JSON-serialisable fields (``ScoreMergeCallback(metadata=...)``); they cannot replace these.
    """
    datamodule = getattr(trainer, "datamodule", None)
    train_domains = list(getattr(datamodule, "train_domains", None) or [])
    domain = domain or (train_domains[0] if len(train_domains) == 1 else None)
    meta: dict[str, Any] = dict(extra or {})
    meta["name"] = name or domain or type(pl_module).__name__
    meta["module"] = prefix or "<trainable parameters>"
    if domain:
        meta["domain"] = domain
    if train_domains:
        meta["train_domains"] = train_domains
    base_model = getattr(pl_module, "base_model", None)
    if isinstance(base_model, str):
        meta["base_model"] = base_model
    if holds_adapters(pl_module):
        meta["adapters"] = adapter_provenance(pl_module)
    meta["global_step"] = int(trainer.global_step)
    meta["precision"] = str(trainer.precision)
    return meta


def choose_submodule(pl_module: pl.LightningModule, module: str | None) -> tuple[nn.Module, list[str] | None]:
    """:meth:`ScoreMergeCallback.select_module`'s default: ``(submodule, keys or None for all its entries)``.

    The attribute path ``module`` when given; else the module's ``image_encoder`` if it has one, else the whole
    module restricted to parameters that require grad.
    """
    if module is not None:
        try:
            submodule = operator.attrgetter(module)(pl_module)
        except AttributeError:
            raise ValueError(
                f"ScoreMergeCallback(module={module!r}): {type(pl_module).__name__} has no attribute "
                f"'{module}'. Pass the attribute path of the submodule to snapshot, e.g. 'image_encoder'."
            ) from None
        if not isinstance(submodule, nn.Module):
            raise ValueError(f"ScoreMergeCallback(module={module!r}) is a {type(submodule).__name__}, not a module.")
        return submodule, None
    if isinstance(getattr(pl_module, "image_encoder", None), nn.Module):
        return pl_module.image_encoder, None
    trainable = [name for name, param in pl_module.named_parameters() if param.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(pl_module).__name__} has no trainable parameters when fitting starts, so there is no task "
            "vector to snapshot. Pass ScoreMergeCallback(module='...') naming the submodule you fine-tune."
        )
    return pl_module, trainable
