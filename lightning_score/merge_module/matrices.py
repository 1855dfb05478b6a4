"""The experts' task vectors in the papers' matrix convention for the merge, and the merge back in the backbone's.

:mod:`lightning_score.models.conventions` says what the convention is: each block's fused q/k/v input projection
and the positional embedding as matrices, the projection as open_clip's ``proj``, whichever library holds the
model; ``qkv="split"`` gives FusionBench's q, k and v as three matrices. MergeModule merges
:func:`to_matrices` of its task vectors and loads :func:`from_matrices` of the result, so the same experts give
the same merged model in open_clip, transformers and timm. For open_clip with ``"fused"`` both are the identity
(the task vectors are passed on as they are, their low-rank factors too).

The data-using methods (their statistics are keyed by the image encoder's own modules) merge in the backbone's
own convention: RegMean and Fisher act per layer or per entry, where the two conventions agree. ESM's
TSV-merged layers do not, so ESM is refused for the transformers and timm backbones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_score.models.conventions import QKV_CONVENTIONS, from_matrix_convention, to_matrix_convention
from lightning_score.task_vector import TaskVector

__all__ = ["check_convention", "from_matrices", "to_matrices"]


def _identity(convention: str, qkv: str) -> bool:
    return convention == "open_clip" and qkv == "fused"


def check_convention(method: str, uses_data: bool, convention: str, qkv: str) -> None:
    """Refuse, before anything is read, a ``qkv`` or method that this backbone's merge cannot honour.

    ``uses_data``: the method collects statistics of the image encoder's layers (ESM, RegMean, Fisher).

    Raises:
        ValueError: An unknown ``qkv``; ``qkv="split"`` with a data-using method; ESM on transformers or timm.
    """
    if qkv not in QKV_CONVENTIONS:
        raise ValueError(f"qkv={qkv!r}: use one of {list(QKV_CONVENTIONS)}.")
    if uses_data and qkv != "fused":
        raise ValueError(
            f"qkv='{qkv}' applies to the data-free methods; '{method}' collects statistics of the image encoder's "
            "own layers and merges in the backbone's own convention: leave qkv at 'fused'."
        )
    if uses_data and method == "esm" and convention != "open_clip":
        raise ValueError(
            f"ESM merges open_clip experts only, not the '{convention}' backbone's: its TSV-merged layers would "
            "see another matrix convention than the paper's. Convert the experts to open_clip "
            "(lightning_score.models.convert.convert_state_dict) or choose another method."
        )


def to_matrices(task_vectors: Sequence[TaskVector], convention: str, qkv: str) -> list[TaskVector]:
    """Each task vector with every matrix as the merge sees it (the input itself for open_clip, ``"fused"``)."""
    if _identity(convention, qkv):
        return list(task_vectors)
    return [TaskVector(to_matrix_convention(tv, convention, qkv=qkv), tv.metadata) for tv in task_vectors]


def from_matrices(merged: TaskVector, convention: str, qkv: str, inputs: Sequence[TaskVector] = ()) -> TaskVector:
    """The merged task vector back in the backbone's own convention, its ``alpha_exempt_keys`` renamed too.

    ``inputs``: the task vectors as read (before :func:`to_matrices`); the merge's record of its inputs names their
    files, which the rewritten ones do not have.
    """
    if _identity(convention, qkv):
        return merged
    metadata = dict(merged.metadata)
    record = dict(metadata.get("merge") or {})
    if inputs and len(record.get("inputs") or []) == len(inputs):
        record["inputs"] = [
            {**entry, "path": entry.get("path") or (str(tv.path) if tv.path else None)}
            for entry, tv in zip(record["inputs"], inputs, strict=True)
        ]
    if record.get("alpha_exempt_keys"):  # names only: one q/k/v-shaped placeholder per key goes the same way
        placeholders = {key: torch.zeros(3, 1) for key in record["alpha_exempt_keys"]}
        record["alpha_exempt_keys"] = sorted(from_matrix_convention(placeholders, convention, qkv=qkv))
    if record:
        metadata["merge"] = record
    return TaskVector(from_matrix_convention(merged, convention, qkv=qkv), metadata)
