"""Decisions shared by every process of a Trainer, through the Trainer's own strategy (never the global group).

A check or a write that runs on rank zero alone must not leave the other ranks waiting at the next
collective when it fails: :func:`on_rank_zero` runs it there, broadcasts the outcome, and raises the same
error on every rank. :func:`gather_outcomes` does the same for work split across ranks. Under a
single-device strategy (even inside processes where a DDP process group exists) both are plain calls.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

__all__ = ["RankError", "gather_outcomes", "on_rank_zero", "rank_share"]

T = TypeVar("T")


class RankError(RuntimeError):
    """Raised on the other ranks when a rank failed with an exception that cannot be sent between processes."""


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself when it survives pickling (so other ranks raise the same type), else a RankError."""
    if error is None:
        return None
    try:
        copy = pickle.loads(pickle.dumps(error))
        if isinstance(copy, BaseException) and str(copy) == str(error):
            return copy
    except Exception:  # any failure to pickle: send a description instead
        pass
    return RankError(f"{type(error).__name__}: {error}")


def _raise_everywhere(failures: Iterable[tuple[int, BaseException | None]], own: BaseException | None) -> None:
    if own is not None:
        raise own
    for rank, failure in failures:
        if failure is not None:
            if hasattr(failure, "add_note"):
                failure.add_note(f"(raised on rank {rank}; every rank stops with it)")
            raise failure


def on_rank_zero(strategy: Strategy, work: Callable[[], T]) -> T:
    """Run ``work`` on global rank zero only and return its result on every rank.

    If ``work`` raises, the same error is raised on every rank (rank zero keeps its traceback), so no
    rank is left waiting at a barrier for one that has stopped.

    Args:
        strategy: The Trainer's strategy: its rank and collectives are used.
        work: What rank zero does; its result must be picklable.

    Returns:
        What ``work`` returned on rank zero.
    """
    result: Any = None
    failure: BaseException | None = None
    if strategy.is_global_zero:
        try:
            result = work()
        except Exception as error:  # re-raised below, on every rank
            failure = error
    if strategy.world_size == 1:
        _raise_everywhere((), failure)
        return result
    shared_result, shared_failure = strategy.broadcast((result, _portable(failure)), src=0)
    _raise_everywhere([(0, shared_failure)], failure)
    return shared_result


def gather_outcomes(strategy: Strategy, work: Callable[[], T]) -> list[T]:
    """Run ``work`` on every rank and give every rank the list of all ranks' results, in rank order.

    If any rank's ``work`` raises, every rank raises (the failing rank its own error, the others the first
    failure), instead of the others waiting in the exchange.
    """
    failure: BaseException | None = None
    result: Any = None
    try:
        result = work()
    except Exception as error:  # re-raised below, on every rank
        failure = error
    if strategy.world_size == 1:
        _raise_everywhere((), failure)
        return [result]
    outcomes = [
        strategy.broadcast((result, _portable(failure)) if strategy.global_rank == rank else None, src=rank)
        for rank in range(strategy.world_size)
    ]
    _raise_everywhere([(rank, outcome[1]) for rank, outcome in enumerate(outcomes)], failure)
    return [outcome[0] for outcome in outcomes]


def _strided_batches(loader: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    for index, batch in enumerate(loader):
        if index % world_size == rank:
            yield batch


def rank_share(loader: Any, rank: int, world_size: int) -> Iterable[Any]:
    """This rank's part of an evaluation loader: every ``world_size``-th sample from ``rank`` on.

    A loader over a map-style dataset in order (its default sequential sampler, every batch kept) is split by
    sample, so each rank reads only its own images; any other loader (a sampler of its own, ``drop_last``, an
    iterable dataset) or iterable falls back to every ``world_size``-th batch of what it yields. The parts are
    disjoint and together cover what the loader yields, once.
    """
    if world_size == 1:
        return loader
    dataset = getattr(loader, "dataset", None)
    in_order = (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and not loader.drop_last
        and isinstance(loader.sampler, SequentialSampler)
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
    )
    if in_order:
        part = Subset(dataset, range(rank, len(dataset), world_size))
        return DataLoader(
            part,
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )
    return _strided_batches(loader, rank, world_size)
