"""prefetched: loads item i+1 in a background thread while the caller works on item i, in order."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_score.merging.prefetch import prefetched

CPU = torch.device("cpu")


@pytest.mark.parametrize("enabled", [False, True])
def test_items_come_in_order_with_their_values(enabled: bool) -> None:
    items = list(range(7))
    got = list(prefetched(items, lambda i: torch.full((2,), float(i)), enabled=enabled, device=CPU))
    assert [item for item, _ in got] == items
    assert all(torch.equal(value, torch.full((2,), float(item))) for item, value in got)


def test_the_next_item_loads_while_the_caller_works() -> None:
    loading: list[tuple[int, str]] = []

    def load(item: int) -> int:
        loading.append((item, threading.current_thread().name))
        time.sleep(0.05)
        return item

    for item, _ in prefetched([0, 1, 2], load, enabled=True, device=CPU):
        time.sleep(0.2)  # the caller's work: the next load has started (and finished) meanwhile
        if item < 2:
            assert (item + 1) in [i for i, _ in loading]
    assert all(name.startswith("lightning-score-prefetch") for _, name in loading)


def test_an_error_is_raised_at_its_item_and_nothing_hangs() -> None:
    def load(item: int) -> int:
        if item == 2:
            raise ValueError("item 2 is broken")
        return item

    seen = []
    with pytest.raises(ValueError, match="item 2 is broken"):
        for item, _ in prefetched([0, 1, 2, 3], load, enabled=True, device=CPU):
            seen.append(item)
    assert seen == [0, 1]


def test_stopping_early_stops_the_background_thread() -> None:
    iterator = prefetched(list(range(100)), lambda i: i, enabled=True, device=CPU)
    next(iterator)
    iterator.close()
    time.sleep(0.1)
    assert not any(t.name.startswith("lightning-score-prefetch") and t.is_alive() for t in threading.enumerate())
