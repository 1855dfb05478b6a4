"""merge_module.sharding: the split of the keys across ranks, and one merge without a strategy."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_score.merge_module.sharding import _cost, merge_on_ranks, shard_keys
from lightning_score.merging import get_method, merge_task_vectors
from lightning_score.task_vector import TaskVector

SHAPES = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=6),
    st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)), st.tuples(st.integers(1, 500))),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(shapes=SHAPES, world_size=st.integers(1, 6))
def test_shares_are_complete_disjoint_deterministic_and_balanced(
    shapes: dict[str, tuple[int, ...]], world_size: int
) -> None:
    shares = shard_keys(shapes, world_size)
    assert len(shares) == world_size
    flat = [key for share in shares for key in share]
    assert sorted(flat) == sorted(shapes) and len(flat) == len(set(flat))  # every key once
    reordered = dict(random.Random(0).sample(sorted(shapes.items()), len(shapes)))
    assert shard_keys(reordered, world_size) == shares  # the same split on every rank, whatever the key order
    loads = [sum(_cost(shapes[k]) for k in share) for share in shares]
    assert max(loads) - min(loads) <= max(_cost(s) for s in shapes.values())  # greedy bound: within one key's cost


def test_the_cost_of_a_matrix_is_its_svd_and_of_a_vector_its_size() -> None:
    assert _cost((4, 6)) == 4 * 6 * 4 and _cost((7,)) == 7 and _cost((2, 3, 4)) == 24
    shares = shard_keys({"big": (64, 64), "v1": (100,), "v2": (100,), "m": (8, 8)}, 2)
    assert shares == [["big"], ["m", "v1", "v2"]]  # the one large matrix outweighs the rest


def test_more_ranks_than_keys_leave_some_shares_empty() -> None:
    assert shard_keys({"a": (2,)}, 3) == [["a"], [], []]


def _task_vectors(count: int = 3) -> list[TaskVector]:
    generator = torch.Generator().manual_seed(0)
    keys = {"transformer.resblocks.0.mlp.c_fc.weight": (6, 4), "transformer.resblocks.0.mlp.c_fc.bias": (6,)}
    return [
        TaskVector({k: torch.randn(*s, generator=generator) for k, s in keys.items()}, {"name": f"t{t}"})
        for t in range(count)
    ]


@pytest.mark.parametrize(("method", "options"), [("score", {}), ("ties", {"density": 0.5}), ("tsv", {})])
@pytest.mark.parametrize("strategy", [None, SimpleNamespace(world_size=1)], ids=["no-strategy", "one-device"])
def test_one_process_merges_exactly_as_merge_task_vectors(method: str, options: dict, strategy: Any) -> None:
    tvs = _task_vectors()
    spec = get_method(method)
    merged = merge_on_ranks(tvs, spec, spec.resolve_options(options), torch.device("cpu"), strategy)
    expected = merge_task_vectors(tvs, method, device="cpu", **options)
    assert list(merged) == list(expected)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    record, expected_record = (
        {k: v for k, v in tv.metadata["merge"].items() if k != "seconds"} for tv in (merged, expected)
    )
    assert record == expected_record  # the same record (options included), resolved options given or not


def test_a_data_method_gets_its_statistics_on_the_merging_device() -> None:
    tvs = _task_vectors(2)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    grams = [{key: torch.eye(4) * (t + 1)} for t in range(2)]
    devices: list[torch.device] = []

    def statistics(device: torch.device) -> dict[str, Any]:
        devices.append(device)
        return {"grams": grams}

    spec = get_method("regmean")
    merged = merge_on_ranks(tvs, spec, spec.resolve_options({}), torch.device("cpu"), None, statistics)
    expected = merge_task_vectors(tvs, "regmean", device="cpu", grams=grams)
    assert devices == [torch.device("cpu")]
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="Method 'regmean' needs data: give it its statistics"):
        merge_on_ranks(tvs, spec, {}, torch.device("cpu"), None)
