"""The merge engine: validates the task vectors, walks the keys one at a time and calls the method.

Only one key's T slices are on the compute device at any moment, so task vectors loaded lazily from
disk merge in about one model's worth of (host) memory: the merged result. Matrix keys go to the
method; every other key gets the plain mean over tasks (as SCORE, TSV-M and Iso do) unless the method merges all
keys itself. The result is α·τ*, in the inputs' dtype, on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_score._version import __version__
from lightning_score.merging.factor_cache import FactorCache
from lightning_score.merging.key_factors import ExpertSet
from lightning_score.merging.keys import is_matrix_key, resolve_device
from lightning_score.merging.prefetch import prefetched
from lightning_score.merging.registry import KeyMerger, KeyStream, get_method
from lightning_score.merging.task_matrices import LowRankUpdate, RankDeficientError, TaskMatrices
from lightning_score.merging.validation import as_task_vectors, check_compatible, raise_non_finite, shape_and_dtype
from lightning_score.task_vector import TaskVector

__all__ = ["merge_task_vectors"]

log = logging.getLogger(__name__)

MatrixPredicate = Callable[[str, tuple[int, ...]], bool]


def _json_safe(value: Any) -> Any:
    """The value if it is plain JSON; otherwise a short placeholder (data such as ESM's activations)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return f"<{type(value).__name__} not recorded>"
    return value


def _too_small(
    method: str, merger: KeyMerger, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], num_tasks: int
) -> set[str]:
    """The keys of fewer singular directions than tasks, for a method that keeps ⌊r/T⌋ of each; one warning names them.

    With T > r the method would keep none of any task's (TSV-M: a zero update; SCORE: a basis of arbitrary
    directions), so these keys get the mean over tasks, as the keys the method does not treat as matrices do.
    """
    found = [
        key
        for key in keys
        if len(shapes[key]) >= 2
        and min(shapes[key]) > 0  # matrices; an empty one has nothing to merge
        and merger.rank_per_task(key, shapes[key], num_tasks) == 0
    ]
    if found:
        listing = ", ".join(f"'{key}' {list(shapes[key])}" for key in found[:5]) + (", ..." if len(found) > 5 else "")
        log.warning(
            "%s: %d key(s) have fewer singular directions than the %d experts merged, so the method would keep none "
            "of any expert's (⌊r/T⌋ = 0): %s. They get the mean of the experts' updates instead, as the keys the "
            "method does not treat as matrices do. Merge fewer experts at a time to merge them by the method.",
            method, len(found), num_tasks, listing,
        )  # fmt: skip
    return set(found)


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, Tensor]],
    method: str = "score",
    *,
    alpha: float = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
    is_matrix: MatrixPredicate = is_matrix_key,
    compute_dtype: torch.dtype | None = None,
    keys: Collection[str] | None = None,
    factors: FactorCache | None = None,
    batch_svd: bool | None = None,
    prefetch: bool | None = None,
    through_factors: bool = True,
    **options: Any,
) -> TaskVector:
    """Merge T task vectors into one: θ = θ₀ + α·τ* once applied.

    Args:
        task_vectors: The experts' task vectors: :class:`~lightning_score.TaskVector` objects (lazy ones
            stream from disk) or any mappings from keys to tensors, all with the same keys, shapes and dtypes.
        method: A name from :func:`list_methods` (``"score"`` by default).
        alpha: The global scaling coefficient α (1.0 in the SCORE paper's protocol).
        device: Where to compute; default CUDA when available, else CPU. The result is always on CPU.
        progress: Show a progress bar over the keys.
        is_matrix: Which keys the method treats as matrices (default :func:`is_matrix_key`); the rest
            get the mean over tasks, unless the method merges every key itself.
        compute_dtype: The dtype to compute in; default the inputs' dtype promoted to at least float32.
        keys: Merge only these keys (the result holds only them), e.g. one process's share of a merge split
            across processes. Statistics over the whole model (TIES, PCB) still read every key.
        factors: A :class:`~lightning_score.merging.FactorCache` shared by several merges: methods that start
            from each task's thin SVD (SCORE, TSV-M, ESM's TSV-merged layers) take the experts' factorizations,
            and what they derive from them for these experts, from it instead of computing them again. The
            result is bit-identical without it.
        batch_svd: Factorize all same-shaped keys of an expert (every block's ``mlp.c_fc.weight``...) through one
            batched solver call before merging (default: on CUDA only). Without ``factors``, the factors are
            kept for this merge only.
        prefetch: Load the next key (or batch) in a background thread while this one is computed (default: on
            CUDA only).
        through_factors: For keys that task vectors keep as factors (LoRA experts), merge from the factors (default)
            in the methods that can (SCORE, TSV-M, CART, Iso-C, Iso-CTS): exact, without the dense T×m×n stack. With
            False the same definition is computed from the dense matrices (each task still keeps k_t = min(k, ρ_t)
            singular directions): for comparison. Other methods read the dense matrices, one key at a time.
        **options: The method's options (see its docstring); unknown ones are rejected.

    Returns:
        α·τ* as a :class:`~lightning_score.TaskVector` in the inputs' dtype, on CPU, whose metadata records
        the method, its options, α and the inputs.

    Raises:
        ValueError: An empty list, task vectors with different keys, shapes, dtypes or base fingerprints,
            non-finite values, or an unknown method or option; the message names what and where.

    Example:
        >>> import torch
        >>> from lightning_score.merging import merge_task_vectors
        >>> tvs = [{"w": torch.randn(8, 6), "b": torch.full((6,), float(t))} for t in range(3)]
        >>> merged = merge_task_vectors(tvs, "score", device="cpu")
        >>> merged["w"].shape, merged["b"][0].item(), merged.metadata["merge"]["method"]
        (torch.Size([8, 6]), 1.0, 'score')
    """
    spec = get_method(method)
    resolved_options = spec.resolve_options(options)  # once: build takes them as they are
    merger = spec.build(resolved_options)
    tvs = as_task_vectors(task_vectors)
    check_compatible(tvs)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    target = resolve_device(device)
    all_keys = list(tvs[0])
    if keys is not None:
        unknown = sorted(set(keys) - set(all_keys))
        if unknown:
            raise ValueError(f"keys={unknown[:3]}... are not keys of the task vectors.")
        if not merger.shardable and set(keys) != set(all_keys):
            raise ValueError(f"Method '{method}' needs every key in one process (it rescales across layers).")
    selected = [k for k in all_keys if keys is None or k in keys]

    def dtype_of(key: str) -> torch.dtype:
        return compute_dtype or torch.promote_types(shape_and_dtype(tvs[0], key)[1], torch.float32)

    def load(key: str) -> Tensor:
        """One key's T slices on the compute device, checked for NaN/inf."""
        dtype = dtype_of(key)
        deltas = torch.stack([tv[key].to(device=target, dtype=dtype, non_blocking=True) for tv in tvs])
        finite = torch.isfinite(deltas.reshape(len(tvs), -1)).all(dim=1)
        if not bool(finite.all()):
            raise_non_finite(tvs, key, int((~finite).nonzero()[0]))
        return deltas

    def load_one(index: int, key: str, dtype: torch.dtype) -> Tensor:
        """One task's slice of a key on the compute device, checked for NaN/inf."""
        matrix = tvs[index][key].to(device=target, dtype=dtype, non_blocking=True)
        if not bool(torch.isfinite(matrix).all()):
            raise_non_finite(tvs, key, index)
        return matrix

    def load_tasks(key: str) -> TaskMatrices:
        """One key's T tasks, factors kept as factors (on the compute device, checked for NaN/inf)."""
        dtype, parts = dtype_of(key), []
        for index, tv in enumerate(tvs):
            update = tv.low_rank(key)
            if update is None:
                parts.append(load_one(index, key, dtype))
                continue
            B, A = (f.to(device=target, dtype=dtype, non_blocking=True) for f in (update.B, update.A))
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                raise_non_finite(tvs, key, index)
            parts.append(LowRankUpdate(B, A, update.scale, dtype))
        tasks = TaskMatrices.of(parts)
        return tasks if through_factors else tasks.densified()

    def in_scope(key: str) -> bool:
        return spec.scope == "all" or is_matrix(key, shape_and_dtype(tvs[0], key)[0])

    started = time.perf_counter()
    shapes = {key: shape_and_dtype(tvs[0], key)[0] for key in all_keys}
    merger.prepare(KeyStream([k for k in all_keys if in_scope(k)], load, shapes, len(tvs)))
    on_cuda = target.type == "cuda"
    batched = on_cuda if batch_svd is None else batch_svd
    overlap = on_cuda if prefetch is None else prefetch
    too_small = _too_small(method, merger, [k for k in selected if in_scope(k)], shapes, len(tvs))
    mergeable = [k for k in selected if in_scope(k) and k not in too_small]
    with_factors = {k for k in merger.low_rank_keys(mergeable) if any(tv.low_rank(k) is not None for tv in tvs)}
    factorized = set(merger.factorized_keys(mergeable)) - with_factors  # factors are cheaper than any cache
    if factors is None and batched and factorized:
        factors = FactorCache.for_one_merge(len(tvs))  # this merge's factors, computed in batches
    experts: ExpertSet | None = None
    if factors is not None and factorized:
        ordered = [k for k in selected if k in factorized]
        dtypes = {k: dtype_of(k) for k in ordered}
        experts = factors.prepare(
            tvs, ordered, device=target, dtypes=dtypes, shapes=shapes, load=load_one, batched=batched, prefetch=overlap
        )

    def read(key: str) -> Tensor | TaskMatrices:
        return load_tasks(key) if key in with_factors else load(key)

    merged: dict[str, Tensor] = {}
    low_rank: dict[str, LowRankUpdate] = {}  # merges of LoRA experts that the method gives as factors
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(selected), desc=f"merge ({method})", unit="key", leave=False)
    for key, deltas in prefetched(selected, read, enabled=overlap, device=target):
        if isinstance(deltas, TaskMatrices):
            try:
                result = merger.merge_key(key, deltas)  # type: ignore[arg-type]
            except RankDeficientError as error:
                raise RankDeficientError(f"Method '{method}', key '{key}' {list(shapes[key])}: {error}") from None
        elif not in_scope(key) or key in too_small:
            result = deltas.mean(dim=0)
        elif experts is not None and key in factorized:
            result = merger.merge_key(key, deltas, factors=experts.key(key, deltas))  # type: ignore[call-arg]
        else:
            result = merger.merge_key(key, deltas)
        if tuple(result.shape) != shapes[key]:
            raise RuntimeError(f"Method '{method}' returned shape {tuple(result.shape)} for key '{key}'.")
        if isinstance(result, LowRankUpdate):
            low_rank[key] = result
        else:
            merged[key] = result
        del deltas
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    merger.finalize(merged)
    for key in selected:
        scale = alpha if merger.scales_with_alpha(key) else 1.0
        input_dtype = shape_and_dtype(tvs[0], key)[1]
        if key in low_rank:  # factors stay in the compute dtype; the update is made dense in the inputs' dtype
            update = low_rank[key]
            low_rank[key] = LowRankUpdate(update.B.cpu(), update.A.cpu(), update.scale * scale, input_dtype)
        else:
            merged[key] = (merged[key] * scale).to(device="cpu", dtype=input_dtype).contiguous()
    seconds = time.perf_counter() - started
    log.debug(
        "Merged %d task vectors (%d keys) with '%s' on %s in %.2f s.", len(tvs), len(selected), method, target, seconds
    )

    first = tvs[0]
    metadata = {
        "name": f"merged-{method}",
        "base_model": first.base_model,
        "base_fingerprint": first.base_fingerprint,
        "merge": {
            "method": method,
            "options": {name: _json_safe(value) for name, value in resolved_options.items()},
            "alpha": float(alpha),
            "inputs": [{"name": tv.name, "domain": tv.domain, "path": str(tv.path) if tv.path else None} for tv in tvs],
            "alpha_exempt_keys": [k for k in selected if not merger.scales_with_alpha(k)],
            **({"low_rank_keys": len(with_factors), "through_factors": through_factors} if with_factors else {}),
            "device": str(target),
            "seconds": round(seconds, 3),
            "lightning_score_version": __version__,
        },
    }
    return TaskVector(merged, {k: v for k, v in metadata.items() if v is not None}, low_rank)
