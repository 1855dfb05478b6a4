"""Exact streamed order statistics (radix select) against sorting."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_score.merging.methods.pcb import PCBMerge
from lightning_score.merging.order_statistics import kth_smallest
from lightning_score.merging.registry import KeyStream


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


# --- the ranks TIES and PCB select (the authors' indices, not the ⌈q·P⌉ quantile) --------------------------


def _one_task_stream(magnitudes: list[float]) -> KeyStream:
    """One task whose P entries have these magnitudes (alternating signs), split over two keys."""
    signs = torch.tensor([(-1.0) ** i for i in range(len(magnitudes))], dtype=torch.float64)
    values = (torch.tensor(magnitudes, dtype=torch.float64) * signs).view(1, -1)
    cut = len(magnitudes) // 3
    parts = {"a": values[:, :cut], "b": values[:, cut:]}
    return KeyStream(list(parts), parts.__getitem__, {k: tuple(v.shape[1:]) for k, v in parts.items()}, 1)


@pytest.mark.parametrize(
    ("P", "low", "high", "old_low", "old_high"),
    [(100, 2.0, 99.0, 1.0, 99.0), (150, 2.0, 148.0, 2.0, 149.0), (300, 4.0, 297.0, 3.0, 297.0)],
)
def test_pcb_clips_at_the_authors_indices(P: int, low: float, high: float, old_low: float, old_high: float) -> None:
    """Magnitudes 1..P shuffled: s[i] = i + 1, so the bounds are int(P·0.01) + 1 and int(P·0.99 − 1) + 1."""
    order = torch.randperm(P, generator=torch.Generator().manual_seed(P)) + 1
    merger = PCBMerge()
    merger.prepare(_one_task_stream(order.double().tolist()))
    assert (merger.low.item(), merger.high.item()) == (low, high)
    assert (low, high) != (old_low, old_high)  # the ⌈q·P⌉-th smallest, used before, is another entry


@pytest.mark.parametrize(("P", "kept"), [(100, 96), (40, 39), (7, 7)])
def test_pcb_floor_is_the_authors_index(P: int, kept: int) -> None:
    """One task: β grows with |τ|, so the floor s_β[int(P·0.95)] is the score of magnitude ``kept``."""
    merger = PCBMerge()
    merger.prepare(_one_task_stream([float(i) for i in range(1, P + 1)]))
    low, high = merger.low.item(), merger.high.item()
    a = (min(max(float(kept), low), high) - low) / (high - low)
    assert merger.floor.item() == pytest.approx(math.exp(a * a) * math.tanh(a * a), rel=1e-12)
    # the ⌈0.95·P⌉-th smallest would be the score of magnitude kept − 1 where 0.95·P is whole
    if (P * 95) % 100 == 0:
        b = (min(max(float(kept - 1), low), high) - low) / (high - low)
        assert merger.floor.item() != pytest.approx(math.exp(b * b) * math.tanh(b * b), rel=1e-6)
