"""Exact streamed order statistics (radix select) against sorting."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_score.merging.order_statistics import kth_smallest, quantile_rank


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_matches_sorting(T: int, sizes: list[int], dtype: torch.dtype, seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    values = torch.randn(T, total, generator=g, dtype=torch.float64) * 10 ** torch.randint(
        -30, 30, (T, total), generator=g
    )
    if ties:  # repeated values, zeros of both signs, extremes
        values[:, ::3] = 0.5
        values[:, 1::5] = -0.0
        values[:, 2::7] = 0.0
    values = values.to(dtype)
    chunks = list(values.split(sizes, dim=1))
    ranks = torch.randint(1, total + 1, (T, 3), generator=g)
    expected = torch.gather(values.sort(dim=1).values, 1, ranks - 1)
    got = kth_smallest(lambda: iter(chunks), ranks)
    assert got.dtype == dtype
    assert torch.equal(got, expected) or torch.equal(got.abs(), expected.abs())  # -0.0 and 0.0 compare equal


def test_extreme_values_and_infinities() -> None:
    values = torch.tensor([[float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0]])
    ranks = torch.arange(1, 8).view(1, 7)
    assert torch.equal(kth_smallest(lambda: [values], ranks), values.sort(dim=1).values)


def test_rank_out_of_range() -> None:
    with pytest.raises(ValueError, match="Rank out of range"):
        kth_smallest(lambda: [torch.ones(1, 4)], torch.tensor([[5]]))


@pytest.mark.parametrize(
    ("q", "count", "rank"),
    [(0.01, 1000, 10), (0.99, 1000, 990), (0.95, 7, 7), (0.0, 10, 1), (0.2, 5, 1), (0.21, 5, 2), (1.0, 9, 9)],
)
def test_quantile_rank_is_the_inverse_empirical_cdf(q: float, count: int, rank: int) -> None:
    assert quantile_rank(q, count) == rank == min(max(math.ceil(q * count - 1e-9), 1), count)
