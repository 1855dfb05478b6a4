"""factor_plan: one merge's factorization settings as one object, the keys split into solver calls, and the calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_score.merging.factor_plan import FactorPlan

CPU = torch.device("cpu")
SHAPES = {"a0": (6, 4), "b0": (4, 9), "a1": (6, 4), "a2": (6, 4), "b1": (4, 9), "odd": (5, 5)}


def _matrices(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{key: torch.randn(shape, generator=g, dtype=dtype) for key, shape in SHAPES.items()} for _ in range(2)]


def _plan(tasks: list[dict[str, torch.Tensor]] | None = None, **settings: object) -> FactorPlan:
    tasks = tasks or _matrices()
    dtypes = dict.fromkeys(SHAPES, torch.float32)
    return FactorPlan(CPU, dtypes, SHAPES, 2, lambda index, key, dtype: tasks[index][key].to(dtype), **settings)


def test_the_merge_reads_r_over_t_triplets() -> None:
    plan = FactorPlan(CPU, {}, {"w": (12, 7), "v": (3, 2, 9)}, 3, lambda *_: torch.zeros(0))
    assert plan.needed("w") == 2 and plan.needed("v") == 0


def test_unbatched_every_key_is_a_call_of_its_own_grouped_by_shape_in_order() -> None:
    assert _plan().chunks(list(SHAPES), torch.float32) == [["a0"], ["a1"], ["a2"], ["b0"], ["b1"], ["odd"]]
    assert _plan(batch_bytes=1).chunks(["b0", "a0"], torch.float32) == [["b0"], ["a0"]]


def test_batched_same_shaped_keys_share_calls_up_to_batch_bytes() -> None:
    keys = list(SHAPES)
    assert _plan(batched=True).chunks(keys, torch.float32) == [["a0", "a1", "a2"], ["b0", "b1"], ["odd"]]
    two_a = 2 * 6 * 4 * 4  # two float32 (6, 4) matrices
    bounded = _plan(batched=True, batch_bytes=two_a).chunks(keys, torch.float32)
    assert bounded == [["a0", "a1"], ["a2"], ["b0"], ["b1"], ["odd"]]
    assert _plan(batched=True, batch_bytes=two_a).chunks(keys, torch.float64)[0] == ["a0"]  # twice the bytes each
    assert _plan(batched=True, batch_bytes=1).chunks(keys, torch.float32)[0] == ["a0"]  # at least one key per call


def test_a_chunk_loads_as_one_matrix_or_a_stack_in_the_asked_dtype() -> None:
    calls: list[tuple[int, str, torch.dtype]] = []
    tasks = _matrices()

    def load(index: int, key: str, dtype: torch.dtype) -> torch.Tensor:
        calls.append((index, key, dtype))
        return tasks[index][key].to(dtype)

    plan = FactorPlan(CPU, {}, SHAPES, 2, load)
    assert torch.equal(plan.load_chunk(1, ["odd"], torch.float64), tasks[1]["odd"].double())
    stacked = plan.load_chunk(0, ["a0", "a1"], torch.float32)
    assert stacked.shape == (2, 6, 4) and torch.equal(stacked[1], tasks[0]["a1"])
    assert calls == [(1, "odd", torch.float64), (0, "a0", torch.float32), (0, "a1", torch.float32)]


@pytest.mark.parametrize(
    "settings", [{}, {"batched": True}, {"batched": True, "prefetch": True}, {"prefetch": True, "batch_bytes": 1}]
)
def test_factorize_yields_each_keys_thin_svd_bit_for_bit(settings: dict) -> None:
    tasks = _matrices(seed=1)
    keys = ["a0", "b0", "a1", "odd", "a2", "b1"]
    got = list(_plan(tasks, **settings).factorize(1, keys, torch.float32))
    assert [key for key, _ in got] == ["a0", "a1", "a2", "b0", "b1", "odd"]  # the chunks' order
    for key, triplet in got:
        for factor, expected in zip(triplet, torch.linalg.svd(tasks[1][key], full_matrices=False), strict=True):
            assert torch.equal(factor, expected), (settings, key)


def test_an_error_while_loading_is_raised_from_factorize() -> None:
    def load(index: int, key: str, dtype: torch.dtype) -> torch.Tensor:
        raise ValueError(f"Key '{key}' of task {index} has non-finite values")

    plan = FactorPlan(CPU, {}, SHAPES, 2, load, batched=True, prefetch=True)
    with pytest.raises(ValueError, match="Key 'a0' of task 0 has non-finite"):
        list(plan.factorize(0, ["a0", "a1"], torch.float32))


def test_a_plan_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _plan().num_tasks = 3  # type: ignore[misc]
