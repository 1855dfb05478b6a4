"""Decisions shared by a Trainer's ranks: one outcome everywhere, the same error everywhere, disjoint loader shares.

The real 2-process paths run in ``tests/callback/test_ddp.py`` and ``tests/merge_module/test_ddp.py``; here the
functions meet a real single-device strategy, and a strategy that plays one rank of two (its ``broadcast``
hands back what the other rank sent) so the error each rank raises is checked without spawning processes.
"""

from __future__ import annotations

import pickle
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_score.utilities.ranks import (
    RankError,
    _portable,
    _raise_everywhere,
    gather_outcomes,
    on_rank_zero,
    rank_share,
)


class MergeFailedError(ValueError):
    """A picklable error of a type of our own (other ranks must raise this type, not a RankError)."""


class NeedsTwoArgumentsError(Exception):
    """Pickles, but does not unpickle: ``args`` holds one formatted string, ``__init__`` takes two."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")


def _single() -> SingleDeviceStrategy:
    strategy = SingleDeviceStrategy(torch.device("cpu"))
    assert strategy.world_size == 1 and strategy.is_global_zero
    return strategy


class OneRankOfTwo(SingleDeviceStrategy):
    """Rank ``rank`` of a world of two: ``broadcast`` returns what ``sent[src]`` holds (the other rank's object)."""

    def __init__(self, rank: int, sent: dict[int, Any]) -> None:
        super().__init__(torch.device("cpu"))
        self.global_rank, self.world_size = rank, 2  # plain attributes in SingleDeviceStrategy
        self.sent, self.broadcasts = sent, []

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.broadcasts.append((src, obj))
        return obj if src == self.global_rank else self.sent[src]


def _counting(result: Any) -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    def work() -> Any:
        calls.append(1)
        return result

    return work, calls


# --- one process ---------------------------------------------------------------------------------------


def test_on_rank_zero_returns_the_work_result_and_runs_it_once() -> None:
    work, calls = _counting({"path": "merged.safetensors"})
    assert on_rank_zero(_single(), work) == {"path": "merged.safetensors"}
    assert calls == [1]


def test_gather_outcomes_returns_the_one_rank_result_in_a_list() -> None:
    work, calls = _counting(7)
    assert gather_outcomes(_single(), work) == [7]
    assert calls == [1]


@pytest.mark.parametrize("run", [on_rank_zero, gather_outcomes])
def test_the_work_error_is_raised_as_is_with_its_traceback(run: Callable) -> None:
    error = MergeFailedError("the expert diverged")

    def work() -> None:
        raise error

    with pytest.raises(MergeFailedError) as caught:
        run(_single(), work)
    assert caught.value is error  # the same object: not a copy, not wrapped
    assert not getattr(error, "__notes__", None)  # one rank: nothing to say about which rank raised
    assert "work" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]


# --- what travels between ranks ------------------------------------------------------------------------


def test_portable_keeps_a_picklable_error_type_and_message() -> None:
    assert _portable(None) is None
    for error in (ValueError("bad key 'visual.proj'"), MergeFailedError("the expert diverged"), KeyError("w")):
        copy = _portable(error)
        assert type(copy) is type(error) and str(copy) == str(error)
        assert pickle.loads(pickle.dumps(copy)).args == error.args  # and it can be sent again


def test_portable_describes_an_error_that_does_not_survive_pickling() -> None:
    unpicklable = RuntimeError("holding a lock")
    unpicklable.lock = threading.Lock()  # type: ignore[attr-defined]  # a lock does not pickle
    unrestorable = NeedsTwoArgumentsError("visual.proj", "shapes differ")
    for error, description in [
        (unpicklable, "RuntimeError: holding a lock"),
        (unrestorable, "NeedsTwoArgumentsError: visual.proj: shapes differ"),
    ]:
        copy = _portable(error)
        assert type(copy) is RankError and str(copy) == description
        assert isinstance(copy, RuntimeError)
        assert pickle.loads(pickle.dumps(copy)).args == (description,)


def test_raise_everywhere_raises_the_own_error_first_else_the_first_failure_with_its_rank() -> None:
    _raise_everywhere([(0, None), (1, None)], None)  # nobody failed: nothing raised
    own, other = ValueError("mine"), ValueError("theirs")
    with pytest.raises(ValueError) as caught:
        _raise_everywhere([(1, other)], own)
    assert caught.value is own and not getattr(own, "__notes__", None)
    first, second = MergeFailedError("rank one"), MergeFailedError("rank two")
    with pytest.raises(MergeFailedError) as caught:
        _raise_everywhere([(0, None), (1, first), (2, second)], None)
    assert caught.value is first
    assert caught.value.__notes__ == ["(raised on rank 1; every rank stops with it)"]
    assert not getattr(second, "__notes__", None)


# --- one rank of two -----------------------------------------------------------------------------------


def test_on_rank_zero_gives_rank_one_the_result_without_running_the_work() -> None:
    work, calls = _counting("unused")
    rank_one = OneRankOfTwo(1, sent={0: ("rank zero's result", None)})
    assert on_rank_zero(rank_one, work) == "rank zero's result"
    assert calls == []  # only rank zero works


def test_on_rank_zero_raises_rank_zeros_error_on_rank_one_with_the_rank_note() -> None:
    rank_one = OneRankOfTwo(1, sent={0: (None, _portable(MergeFailedError("disk full")))})
    with pytest.raises(MergeFailedError, match="disk full") as caught:
        on_rank_zero(rank_one, lambda: None)
    assert caught.value.__notes__ == ["(raised on rank 0; every rank stops with it)"]


def test_on_rank_zero_sends_its_error_before_raising_it() -> None:
    rank_zero = OneRankOfTwo(0, sent={})
    error = MergeFailedError("disk full")

    def work() -> None:
        raise error

    with pytest.raises(MergeFailedError) as caught:
        on_rank_zero(rank_zero, work)
    assert caught.value is error
    [(src, (result, sent))] = rank_zero.broadcasts
    assert src == 0 and result is None and type(sent) is MergeFailedError and str(sent) == "disk full"


def test_gather_outcomes_collects_every_rank_in_rank_order() -> None:
    rank_one = OneRankOfTwo(1, sent={0: ("from rank 0", None)})
    assert gather_outcomes(rank_one, lambda: "from rank 1") == ["from rank 0", "from rank 1"]
    assert [src for src, _ in rank_one.broadcasts] == [0, 1]


def test_gather_outcomes_raises_the_other_ranks_failure_on_a_rank_that_succeeded() -> None:
    rank_one = OneRankOfTwo(1, sent={0: (None, RankError("NeedsTwoArgumentsError: w: bad"))})
    with pytest.raises(RankError) as caught:
        gather_outcomes(rank_one, lambda: "fine")
    assert str(caught.value) == "NeedsTwoArgumentsError: w: bad"
    assert caught.value.__notes__ == ["(raised on rank 0; every rank stops with it)"]


# --- rank_share ----------------------------------------------------------------------------------------


def _samples(batches) -> list[list[int]]:
    return [batch[0].tolist() for batch in batches]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_rank_share_splits_a_map_style_loader_into_disjoint_shares_covering_it_once(world_size: int, n: int) -> None:
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=2)
    shares = [_samples(rank_share(loader, rank, world_size)) for rank in range(world_size)]
    for rank, batches in enumerate(shares):
        assert [len(b) for b in batches[:-1]] == [2] * (len(batches) - 1)  # the loader's batch size
        # every world_size-th sample from rank on, in the loader's order
        assert [s for b in batches for s in b] == list(range(rank, n, world_size))
    every = sorted(s for batches in shares for b in batches for s in b)
    assert every == list(range(n))  # each sample exactly once


def test_rank_share_of_one_rank_is_the_loader_itself() -> None:
    loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=2)
    assert rank_share(loader, 0, 1) is loader


def test_rank_share_keeps_the_loaders_collate_function() -> None:
    def collate(items: list) -> dict:
        return {"x": torch.stack([item[0] for item in items])}

    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=2, collate_fn=collate)
    assert [b["x"].tolist() for b in rank_share(loader, 1, 2)] == [[1, 3], [5]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_share_falls_back_to_every_nth_batch_for_a_plain_iterable(world_size: int) -> None:
    batches = [torch.full((2,), i) for i in range(7)]
    shares = [list(rank_share(iter(batches), rank, world_size)) for rank in range(world_size)]
    for rank, share in enumerate(shares):
        assert [int(b[0]) for b in share] == list(range(rank, 7, world_size))  # whole batches, in order
    assert sorted(int(b[0]) for share in shares for b in share) == list(range(7))


def test_rank_share_of_a_loader_without_a_batch_size_strides_its_batches() -> None:
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=None)  # one sample per "batch"
    assert [int(b[0]) for b in rank_share(loader, 1, 2)] == [1, 3, 5]
