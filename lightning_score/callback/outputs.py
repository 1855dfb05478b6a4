"""What ScoreMergeCallback writes when training ends: τ = θ_T − θ₀, the optional merge, and the receipt.

A task vector already at the file is replaced only when it is this fit's own (a rerun of the same fit, or a resumed
one: the same provenance, :func:`check_overwrite`), or when the callback is given ``overwrite=True``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_score.callback.merge_with import merge_expert
from lightning_score.callback.receipts import Receipt
from lightning_score.callback.records import Snapshot
from lightning_score.callback.snapshot import read_snapshot
from lightning_score.task_vector import LowRankUpdate, TaskVector

__all__ = ["check_overwrite", "write_outputs"]

_NOT_IDENTITY = frozenset({"global_step"})  # a resumed fit may train on past the step an earlier write recorded


def check_overwrite(path: Path, metadata: dict[str, Any], fingerprint: str, overwrite: bool) -> None:
    """Refuse to replace a task vector that another fit wrote (another provenance), unless ``overwrite``.

    The same fit run again, or resumed, records the same provenance (expert, domains, module, base model, θ₀'s
    fingerprint, precision and the ``metadata=...`` given to the callback; the step aside): its file is its own.

    Args:
        path: The task-vector file about to be written.
        metadata: The provenance this fit records (:func:`~lightning_score.callback.records.task_vector_metadata`).
        fingerprint: θ₀'s fingerprint (the ``base_fingerprint`` it records).
        overwrite: Replace whatever is there.

    Raises:
        ValueError: ``path`` holds another fit's task vector, or a file that is not a task vector.
    """
    if overwrite or not path.exists():
        return
    fix = (
        "Pass ScoreMergeCallback(overwrite=True) to replace it, or give this fit another name, filename or dirpath "
        "(the default folder follows trainer.default_root_dir)."
    )
    try:
        stored = TaskVector.load(path).metadata
    except ValueError as error:
        raise ValueError(
            f"ScoreMergeCallback: '{path}' is in the way and is not a task vector ({error}). {fix}"
        ) from None
    wanted = json.loads(json.dumps({**metadata, "base_fingerprint": fingerprint}))  # as the file would record it
    keys = (set(wanted) | set(stored)) - _NOT_IDENTITY
    differing = sorted(key for key in keys if stored.get(key) != wanted.get(key))
    if differing:
        raise ValueError(
            f"ScoreMergeCallback: '{path}' holds the task vector of another fit ({', '.join(differing)} differ), which "
            f"this fit would replace. {fix}"
        )


def write_outputs(
    snapshot: Snapshot,
    state: dict[str, Tensor],
    metadata: dict[str, Any],
    path: Path,
    merge: tuple[Sequence[Path], str, float, dict[str, Any]],
    receipt: Receipt,
    device: torch.device,
    overwrite: bool = False,
    factors: Mapping[str, LowRankUpdate] | None = None,
) -> dict[str, Any]:
    """Write τ = θ_T − θ₀ (in float64, stored in θ₀'s dtype), merge it with ``merge_with``, record the files.

    Args:
        snapshot: Where θ₀ is.
        state: The live weights θ_T.
        metadata: The task vector's provenance (:func:`~lightning_score.callback.records.task_vector_metadata`).
        path: The task vector's file.
        merge: ``(merge_with, method, alpha, options)``; nothing is merged when ``merge_with`` is empty.
        receipt: Where the files are recorded for other processes.
        device: Where to compute the merge.
        overwrite: Replace a task vector of another fit at ``path`` (see :func:`check_overwrite`).
        factors: Entries written as the LoRA adapters' factors instead of θ_T − θ₀ (exact: s·B·A, not rounded to
            the weight's dtype as ``θ₀ + s·B·A`` is).

    Returns:
        The files written: ``task_vector``, ``merged`` (or None), ``pretrained``, and θ₀'s ``fingerprint``
        and ``module``.

    Raises:
        ValueError: ``path`` holds another fit's task vector (checked again here: another process may have
            written it since the fit started).
    """
    pretrained = read_snapshot(snapshot.path, snapshot.fingerprint)
    if set(pretrained) != set(state):
        only = sorted(set(pretrained) ^ set(state))[:3]
        raise RuntimeError(f"ScoreMergeCallback: the module's keys changed during fitting (e.g. {only}).")
    fingerprint = snapshot.fingerprint  # θ₀'s, not hashed again; recorded after the other fields, as before
    check_overwrite(path, metadata, fingerprint, overwrite)
    # the adapters' factors in θ₀'s dtype, as every entry (a bf16-true fit's θ₀ is the float32 base it started from)
    low_rank = {
        k: LowRankUpdate(u.B, u.A, u.scale, pretrained[k].dtype) for k, u in (factors or {}).items() if k in state
    }
    dense = sorted(k for k in state if k not in low_rank)  # θ_T − θ₀ for the other entries only
    tv = TaskVector.from_state_dicts(pretrained, state, dense, **metadata, base_fingerprint=fingerprint)
    if low_rank:
        tv = TaskVector({k: tv[k] for k in tv}, tv.metadata, low_rank)
    written = tv.save(path)
    rank_zero_info(f"ScoreMergeCallback: wrote the task vector of '{tv.name}' to {written}")
    outputs: dict[str, Any] = {"task_vector": str(written), "merged": None, "pretrained": str(snapshot.path),
                               "fingerprint": snapshot.fingerprint, "module": snapshot.module}  # fmt: skip
    merge_with, method, alpha, options = merge
    if merge_with:
        outputs["merged"] = str(merge_expert(written, merge_with, method, alpha, options, device))
    receipt.write(outputs)
    return outputs
