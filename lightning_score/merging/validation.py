"""What merge inputs must satisfy, checked before any work: task vectors of one base model, keys, shapes, dtypes.

Every public entry point of the merge core (:func:`~lightning_score.merging.merge_task_vectors`, the subspace
analysis) accepts any sequence of mappings from keys to tensors and checks them here, with messages that name
the task vector (its file or name), the key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_score.task_vector import TaskVector

__all__ = ["as_task_vectors", "check_compatible", "label", "raise_non_finite", "shape_and_dtype"]


def as_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> list[TaskVector]:
    """The inputs as TaskVector objects (a plain mapping becomes ``task <i>``); a clear error for anything else.

    Example:
        >>> import torch
        >>> [tv.name for tv in as_task_vectors([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])]
        ['task 0', 'task 1']
    """
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise ValueError(
            "merge_task_vectors takes a sequence of task vectors (one mapping key -> tensor per expert); "
            f"got {type(task_vectors).__name__}. Wrap a single task vector in a list."
        )
    if len(task_vectors) == 0:
        raise ValueError(
            "merge_task_vectors got an empty list of task vectors: pass at least one, e.g. "
            "[TaskVector.load(p) for p in paths]."
        )
    out = []
    for index, tv in enumerate(task_vectors):
        if isinstance(tv, TaskVector):
            out.append(tv)
        elif isinstance(tv, Mapping):
            out.append(TaskVector(tv, {"name": f"task {index}"}))
        else:
            raise ValueError(f"Task vector {index} is a {type(tv).__name__}, not a mapping from keys to tensors.")
    return out


def label(tv: TaskVector, index: int) -> str:
    """``task <index> (<its file or name>)``, for messages."""
    return f"task {index} ({tv.describe()})"


def check_compatible(tvs: list[TaskVector]) -> None:
    """Same keys, same base weights, same shape and dtype per key; raise naming what differs.

    Keys come first: a base fingerprint covers the keys of its task vector, so experts of one base model whose
    trainable layers differed have different fingerprints, and only the keys say what is wrong.
    """
    reference_keys = list(tvs[0])
    reference_set = set(reference_keys)
    for index, tv in enumerate(tvs[1:], start=1):
        keys = set(tv)
        if keys != reference_set:
            missing = sorted(reference_set - keys)
            extra = sorted(keys - reference_set)
            raise ValueError(
                f"Task vectors have different keys: {label(tv, index)} lacks {len(missing)} key(s) of "
                f"{label(tvs[0], 0)} (e.g. {missing[:3]}) and has {len(extra)} it lacks (e.g. {extra[:3]}). "
                "Make every task vector from the same module with the same layers trainable: an expert fine-tuned "
                "with a layer frozen has no entry for it (ScoreMergeCallback keeps the trainable parameters unless "
                "given module=...)."
            )
    fingerprints = {tv.base_fingerprint for tv in tvs if tv.base_fingerprint}
    if len(fingerprints) > 1:
        groups: dict[str, list[str]] = {}
        for index, tv in enumerate(tvs):
            groups.setdefault(tv.base_fingerprint or "unknown", []).append(label(tv, index))
        listing = "; ".join(f"{fp[:20]}…: {', '.join(names)}" for fp, names in groups.items())
        raise ValueError(
            "The task vectors were made from different pre-trained weights (base fingerprints differ): "
            f"{listing}. Merge only experts fine-tuned from the same base model."
        )
    for key in reference_keys:
        shape, dtype = shape_and_dtype(tvs[0], key)
        if not dtype.is_floating_point:
            raise ValueError(f"Key '{key}' of {label(tvs[0], 0)} has dtype {dtype}; task vectors are floating point.")
        for index, tv in enumerate(tvs[1:], start=1):
            other_shape, other_dtype = shape_and_dtype(tv, key)
            if other_shape != shape:
                raise ValueError(
                    f"Key '{key}' has shape {shape} in {label(tvs[0], 0)} but {other_shape} in "
                    f"{label(tv, index)}: the experts must share one architecture."
                )
            if other_dtype != dtype:
                raise ValueError(
                    f"Key '{key}' has dtype {dtype} in {label(tvs[0], 0)} but {other_dtype} in "
                    f"{label(tv, index)}: convert them to one dtype before merging."
                )


def raise_non_finite(tvs: list[TaskVector], key: str, index: int) -> None:
    """Raise the error for task ``index`` having NaN or inf in ``key``, naming it and the fix."""
    raise ValueError(
        f"Key '{key}' of {label(tvs[index], index)} has non-finite values (NaN or inf): that expert "
        "diverged. Re-train it (lower the learning rate) or leave it out of the merge."
    )


def shape_and_dtype(tv: TaskVector, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """A key's shape and dtype, from the file header for a lazily loaded task vector."""
    spec = tv.tensor_spec(key)
    return tuple(spec[0]), spec[1]
