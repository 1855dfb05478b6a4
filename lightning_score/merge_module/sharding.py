"""One merge for all of a Trainer's processes: split by keys across the ranks, or done once on rank zero.

* A shardable method (every key merged on its own: SCORE, TSV, Iso, TIES...) is split into shares of about
  equal cost (:func:`shard_keys`); each rank merges its share and the shares are exchanged through the
  Trainer's strategy, so every rank ends with the whole τ*.
* A method that needs every key at once or data (ESM, RegMean, Fisher) is merged by rank zero alone, which
  collects the statistics and broadcasts τ*.

A failure on any rank is raised on every rank (:mod:`lightning_score.utilities.ranks`). Under a single-device
strategy, or with no Trainer, it is a plain :func:`~lightning_score.merging.merge_task_vectors` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_score.merging import FactorCache, MethodSpec, merge_task_vectors
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.ranks import gather_outcomes, on_rank_zero

__all__ = ["merge_on_ranks", "shard_keys"]

Statistics = Callable[[torch.device], Mapping[str, Any]]


def _cost(shape: tuple[int, ...]) -> int:
    """Rough relative cost of merging one key: m·n·r for matrices, the entry count otherwise."""
    if len(shape) == 2:
        return shape[0] * shape[1] * min(shape)
    size = 1
    for dim in shape:
        size *= dim
    return size


def shard_keys(shapes: Mapping[str, tuple[int, ...]], world_size: int) -> list[list[str]]:
    """Split keys into ``world_size`` shares of about equal merge cost (largest first, to the lightest share).

    Deterministic, so every rank computes the same split without communicating.

    Example:
        >>> shard_keys({"a": (4, 4), "b": (4, 4), "c": (3,)}, 2)
        [['a', 'c'], ['b']]
    """
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for key in sorted(shapes, key=lambda k: (-_cost(shapes[k]), k)):
        lightest = loads.index(min(loads))
        shares[lightest].append(key)
        loads[lightest] += _cost(shapes[key])
    return shares


def _portable(merged: TaskVector) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return {k: merged[k] for k in merged}, merged.metadata


def merge_on_ranks(
    task_vectors: Sequence[TaskVector],
    method: MethodSpec,
    options: Mapping[str, Any],
    device: torch.device,
    strategy: Strategy | None,
    statistics: Statistics | None = None,
    factors: FactorCache | None = None,
) -> TaskVector:
    """τ* at α = 1, the same on every rank of ``strategy``.

    Args:
        task_vectors: The experts' task vectors.
        method: The merge method's registration (:func:`~lightning_score.merging.get_method`).
        options: Its options (resolved or not: :func:`~lightning_score.merging.merge_task_vectors` checks them).
        device: Where each rank computes.
        strategy: The Trainer's strategy (``None``: this process alone).
        statistics: For data methods: computes their statistics options (``{"grams": [...]}``...) on the
            merging rank (see :func:`lightning_score.merge_module.statistics.collect_statistics`).
        factors: Each expert's factorizations, shared with other merges (a rank computes those of its keys).

    Returns:
        τ* on CPU; under a sharded merge its metadata records ``sharded_over_ranks``.
    """

    def merge(keys: list[str] | None) -> TaskVector:
        kwargs = dict(options)
        if method.needs_data:
            if statistics is None:
                raise ValueError(f"Method '{method.name}' needs data: give it its statistics.")
            kwargs.update(statistics(device))
        if keys is not None:
            kwargs["keys"] = keys
        return merge_task_vectors(task_vectors, method.name, device=device, factors=factors, **kwargs)

    if strategy is None or strategy.world_size == 1:
        return merge(None)
    if not method.shardable or method.needs_data:
        return TaskVector(*on_rank_zero(strategy, lambda: _portable(merge(None))))
    shapes = {k: task_vectors[0].tensor_spec(k)[0] for k in task_vectors[0]}
    share = shard_keys(shapes, strategy.world_size)[strategy.global_rank]
    parts = gather_outcomes(strategy, lambda: _portable(merge(share)))
    tensors = {k: v for part, _ in parts for k, v in part.items()}
    metadata = parts[0][1]
    metadata["merge"]["sharded_over_ranks"] = strategy.world_size
    metadata["merge"]["alpha_exempt_keys"] = sorted(
        {k for _, meta in parts for k in meta["merge"]["alpha_exempt_keys"]}
    )
    return TaskVector({k: tensors[k] for k in shapes}, metadata)
