"""Step 1 of the analysis: validate the task vectors, choose their matrix keys, and stream them one key at a time."""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_score.merging.validation import as_task_vectors, check_compatible
from lightning_score.task_vector import TaskVector

__all__ = ["MatrixPredicate", "depth_key"]

MatrixPredicate = Callable[[str, tuple[int, ...]], bool]


def _check_energy(energy: float) -> None:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not (0.0 < float(energy) <= 1.0):
        raise ValueError(
            f"energy must be a number in (0, 1] (the fraction of each task matrix's squared Frobenius norm "
            f"that its basis must hold, e.g. 0.97), got {energy!r}."
        )


def _prepare(
    function: str,
    task_vectors: Sequence[Mapping[str, Tensor]],
    energy: float,
    is_matrix: MatrixPredicate,
    keys: Collection[str] | None,
    prefix: str | Sequence[str] | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[list[TaskVector], list[str], torch.device]:
    """Validate everything up front and choose the keys; raises ValueError naming what is wrong."""
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise ValueError(
            f"{function} takes a sequence of task vectors (one mapping key -> tensor per expert); got "
            f"{type(task_vectors).__name__}. Wrap a single task vector in a list."
        )
    if len(task_vectors) == 0:
        raise ValueError(
            f"{function} got an empty list of task vectors: pass at least one, e.g. "
            "[TaskVector.load(p) for p in paths]."
        )
    _check_energy(energy)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (SVDs need at least float32), got {dtype}.")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{target}' was requested but CUDA is not available here; pass device='cpu'.")
    tvs = as_task_vectors(task_vectors)
    check_compatible(tvs)
    return tvs, _select_keys(tvs[0], is_matrix, keys, prefix), target


def _select_keys(
    reference: TaskVector,
    is_matrix: MatrixPredicate,
    keys: Collection[str] | None,
    prefix: str | Sequence[str] | None,
) -> list[str]:
    """The matrix keys to analyse, in the task vectors' order."""
    all_keys = list(reference)
    candidates = all_keys
    if prefix is not None:
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        candidates = [k for k in candidates if k.startswith(prefixes)]
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        wanted = set(keys)
        unknown = sorted(wanted - set(all_keys))
        if unknown:
            raise ValueError(
                f"{len(unknown)} requested key(s) are not in the task vectors, e.g. {unknown[:3]}; "
                f"the task vectors have keys such as {all_keys[:3]}."
            )
        not_matrices = [k for k in all_keys if k in wanted and not is_matrix(k, reference.tensor_spec(k)[0])]
        if not_matrices:
            shape = tuple(reference.tensor_spec(not_matrices[0])[0])
            raise ValueError(
                f"Requested key '{not_matrices[0]}' (shape {shape}) is not a matrix key: SAR and spectra are "
                "defined for 2-D matrix keys (see is_matrix_key). Leave it out, or pass another is_matrix predicate."
            )
        candidates = [k for k in candidates if k in wanted]
    selected = sorted((k for k in candidates if is_matrix(k, tuple(reference.tensor_spec(k)[0]))), key=depth_key)
    if not selected:
        raise ValueError(
            f"No matrix keys selected (the task vectors have {len(all_keys)} key(s); prefix={prefix!r}, "
            f"keys={None if keys is None else sorted(keys)[:5]!r}). SAR and spectra need 2-D matrix keys such as "
            "'transformer.resblocks.0.attn.in_proj_weight': check the prefix, the key list or the is_matrix predicate."
        )
    return selected


def depth_key(key: str) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    """Sort key that puts state-dict keys in depth order: embeddings, numbered blocks, then the rest.

    Keys with ``embed`` in their name and no block number come first, keys with a block number (``.N.``)
    next, everything else (the output projection, final norms) last; within each group runs of digits
    compare as numbers, so ``resblocks.2`` comes before ``resblocks.10``. Results list their keys in this
    order whatever the task vectors' own order (a safetensors file stores its keys alphabetically), so
    in-memory and on-disk inputs agree and per-layer plots read from input to output.

    Example:
        >>> keys = ["proj", "transformer.resblocks.10.mlp.c_fc.weight", "positional_embedding",
        ...         "transformer.resblocks.2.mlp.c_fc.weight"]
        >>> sorted(keys, key=depth_key)  # doctest: +NORMALIZE_WHITESPACE
        ['positional_embedding', 'transformer.resblocks.2.mlp.c_fc.weight',
         'transformer.resblocks.10.mlp.c_fc.weight', 'proj']
    """
    natural = tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key) if part)
    if _BLOCK.search(key):
        return 1, natural
    return (0 if "embed" in key.lower() else 2), natural


_BLOCK = re.compile(r"(?:^|\.)\d+\.")


def _names(tvs: list[TaskVector]) -> list[str]:
    return [tv.name if tv.name else f"task {index}" for index, tv in enumerate(tvs)]


def _stream(
    tvs: list[TaskVector], keys: list[str], device: torch.device, dtype: torch.dtype, progress: bool, description: str
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, [T, m, n])`` one key at a time on the compute device, checked for NaN and inf."""
    iterator: Any = keys
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(keys, desc=description, unit="key", leave=False)
    for key in iterator:
        deltas = torch.stack([tv[key].to(device=device, dtype=dtype) for tv in tvs])
        finite = torch.isfinite(deltas.reshape(len(tvs), -1)).all(dim=1)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            raise ValueError(
                f"Key '{key}' of task {index} ({tvs[index].describe()}) has non-finite values (NaN or inf): that "
                "expert diverged. Re-train it (lower the learning rate) or leave it out of the analysis."
            )
        yield key, deltas
