"""What ScoreMergeCallback writes when training ends: τ = θ_T − θ₀, the optional merge, and the receipt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_score.callback.merge_with import merge_expert
from lightning_score.callback.receipts import Receipt
from lightning_score.callback.records import Snapshot
from lightning_score.callback.snapshot import read_snapshot
from lightning_score.task_vector import TaskVector

__all__ = ["write_outputs"]


def write_outputs(
    snapshot: Snapshot,
    state: dict[str, Tensor],
    metadata: dict[str, Any],
    path: Path | None,
    folder: Path,
    merge: tuple[Sequence[Path], str, float, dict[str, Any]],
    receipt: Receipt,
    device: torch.device,
) -> dict[str, Any]:
    """Write τ = θ_T − θ₀ (in float64, stored in θ₀'s dtype), merge it with ``merge_with``, record the files.

    Args:
        snapshot: Where θ₀ is.
        state: The live weights θ_T.
        metadata: The task vector's provenance (:func:`~lightning_score.callback.records.task_vector_metadata`).
        path: The task vector's file; default ``<folder>/<name>.safetensors``.
        folder: The task vectors' folder.
        merge: ``(merge_with, method, alpha, options)``; nothing is merged when ``merge_with`` is empty.
        receipt: Where the files are recorded for other processes.
        device: Where to compute the merge.

    Returns:
        The files written: ``task_vector``, ``merged`` (or None), ``pretrained``, and θ₀'s ``fingerprint``
        and ``module``.
    """
    pretrained = read_snapshot(snapshot.path, snapshot.fingerprint)
    if set(pretrained) != set(state):
        only = sorted(set(pretrained) ^ set(state))[:3]
        raise RuntimeError(f"ScoreMergeCallback: the module's keys changed during fitting (e.g. {only}).")
    fingerprint = snapshot.fingerprint  # θ₀'s, not hashed again; recorded after the other fields, as before
    tv = TaskVector.from_state_dicts(pretrained, state, sorted(state), **metadata, base_fingerprint=fingerprint)
    written = tv.save(path or folder / f"{tv.name}.safetensors")
    rank_zero_info(f"ScoreMergeCallback: wrote the task vector of '{tv.name}' to {written}")
    outputs: dict[str, Any] = {"task_vector": str(written), "merged": None, "pretrained": str(snapshot.path),
                               "fingerprint": snapshot.fingerprint, "module": snapshot.module}  # fmt: skip
    merge_with, method, alpha, options = merge
    if merge_with:
        outputs["merged"] = str(merge_expert(written, merge_with, method, alpha, options, device))
    receipt.write(outputs)
    return outputs
