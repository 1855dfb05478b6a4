"""What ScoreMergeCallback keeps between the events of a fit (where θ₀ is, a receipt of what it wrote), and helpers.

* :class:`Snapshot`: the submodule's state-dict prefix, the θ₀ file (:mod:`lightning_score.callback.snapshot`) and its
  fingerprint: all that a checkpoint carries.
* :class:`Receipt`: a small JSON file in the temporary folder, named after one callback instance, listing the
  files its last fit wrote. Under ``ddp_spawn`` the fit runs in worker processes whose callback state never
  comes back to the main process; the receipt is how the main process (and later test workers) find them.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_score.callback.snapshot import read_snapshot
from lightning_score.utilities.files import atomic_write_text

__all__ = [
    "Receipt",
    "Snapshot",
    "clean_key",
    "compare_with_snapshot",
    "expected_fingerprint",
    "state_prefix",
    "task_vector_metadata",
]

_COMPILED = re.compile(r"(^|\.)_orig_mod\.")


def clean_key(key: str) -> str:
    """A state-dict key without the ``_orig_mod.`` that ``torch.compile`` wrappers insert.

    Example:
        >>> clean_key("head._orig_mod.0.weight"), clean_key("_orig_mod.proj")
        ('head.0.weight', 'proj')
    """
    return _COMPILED.sub(r"\1", key)


@dataclass(frozen=True)
class Snapshot:
    """Where θ₀ of one fit is: the submodule's state-dict prefix, the snapshot file, its fingerprint."""

    module: str
    path: Path
    fingerprint: str


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


class Receipt:
    """The files one callback instance's last fit wrote, readable by any process on the machine.

    Args:
        token: Unique per callback instance (it travels with the callback to spawned workers).
    """

    def __init__(self, token: str) -> None:
        self.path = Path(tempfile.gettempdir()) / "lightning-score" / f"callback-{token}.json"

    def read(self) -> dict[str, Any] | None:
        """The recorded outputs, or None."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, outputs: dict[str, Any]) -> None:
        """Record the outputs (atomically)."""
        atomic_write_text(self.path, json.dumps(outputs))

    def forget(self) -> None:
        """Remove the record (a new fit starts)."""
        self.path.unlink(missing_ok=True)


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
    meta["global_step"] = int(trainer.global_step)
    meta["precision"] = str(trainer.precision)
    return meta
