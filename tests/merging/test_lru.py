"""lru: the byte-bounded least-recently-used memory of a FactorCache."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging.lru import LRUStore, nbytes_of


def _bytes(count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.uint8)


def test_nbytes_counts_the_tensors_of_nested_tuples_and_lists_only() -> None:
    assert nbytes_of(torch.zeros(3, 4, dtype=torch.float64)) == 96
    assert nbytes_of((torch.zeros(2), [torch.zeros(3, dtype=torch.float16), (torch.zeros(1),)])) == 8 + 6 + 4
    assert nbytes_of("text") == nbytes_of(7) == nbytes_of(None) == nbytes_of({"a": torch.zeros(9)}) == 0


def test_the_least_recently_used_goes_first() -> None:
    store = LRUStore(max_bytes=30)
    for name in "abc":
        assert store.put(name, _bytes(10))
    assert store.get("a") is not None  # a read makes "a" the most recently used: "b" is now the oldest
    store.put("d", _bytes(10))
    assert list(store) == ["c", "a", "d"] and "b" not in store and store.nbytes == 30
    store.put("e", _bytes(20))  # needs two slots: the two oldest go
    assert list(store) == ["d", "e"] and store.nbytes == 30


def test_peek_leaves_the_order_alone() -> None:
    store = LRUStore(max_bytes=20)
    store.put("a", _bytes(10))
    store.put("b", _bytes(10))
    assert store.peek("a") is not None and store.peek("zzz") is None
    store.put("c", _bytes(10))
    assert list(store) == ["b", "c"]


def test_replacing_a_value_counts_only_the_new_one() -> None:
    store = LRUStore()
    store.put("a", _bytes(10))
    store.put("b", (_bytes(5), _bytes(5)))
    store.put("a", _bytes(3))
    assert store.nbytes == 13 and list(store) == ["b", "a"] and len(store) == 2
    assert store.get("a").numel() == 3


def test_a_value_larger_than_the_bound_is_not_stored_and_evicts_nothing() -> None:
    store = LRUStore(max_bytes=16)
    store.put("a", _bytes(8))
    store.put("big", _bytes(4))
    assert not store.put("big", _bytes(17))
    assert list(store) == ["a", "big"] and store.get("big").numel() == 4 and store.nbytes == 12
    assert LRUStore(max_bytes=0).put("a", "no tensors: 0 bytes")


def test_without_a_bound_nothing_is_dropped() -> None:
    store = LRUStore()
    for index in range(50):
        store.put(index, _bytes(1000))
    assert len(store) == 50 and store.nbytes == 50_000


def test_discard_and_clear_keep_the_byte_count_right() -> None:
    store = LRUStore()
    for name in [("derived", 1), ("factors", 1), ("derived", 2)]:
        store.put(name, _bytes(10))
    store.discard(lambda name: name[0] == "derived" and name[1] != 2)
    assert list(store) == [("factors", 1), ("derived", 2)] and store.nbytes == 20
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.get(("factors", 1)) is None


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes must be ≥ 0 or None"):
        LRUStore(max_bytes=-1)
