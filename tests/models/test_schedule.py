"""warmup_cosine: the protocol's learning-rate multiplier, checked against its formula at the points that matter."""

from __future__ import annotations

import itertools
import math

import pytest

from lightning_score.models.schedule import warmup_cosine

WARMUP, TOTAL = 10, 110


def _cosine(step: int, warmup: int = WARMUP, total: int = TOTAL) -> float:
    """After warm-up: 0.5·(1 + cos(π·(step − warmup)/(total − warmup))), held at 0 past the end."""
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def test_warm_up_starts_at_one_over_its_length_and_rises_linearly() -> None:
    assert warmup_cosine(0, WARMUP, TOTAL) == pytest.approx(1 / WARMUP)
    for step in range(WARMUP):
        assert warmup_cosine(step, WARMUP, TOTAL) == pytest.approx((step + 1) / WARMUP)
    rises = [warmup_cosine(s + 1, WARMUP, TOTAL) - warmup_cosine(s, WARMUP, TOTAL) for s in range(WARMUP - 1)]
    assert rises == pytest.approx([1 / WARMUP] * (WARMUP - 1))


def test_the_end_of_warm_up_is_the_peak() -> None:
    assert warmup_cosine(WARMUP - 1, WARMUP, TOTAL) == 1.0  # the last warm-up step reaches 1
    assert warmup_cosine(WARMUP, WARMUP, TOTAL) == 1.0  # and the decay starts from it
    assert max(warmup_cosine(s, WARMUP, TOTAL) for s in range(TOTAL + 5)) == 1.0


def test_the_decay_follows_the_half_cosine() -> None:
    assert warmup_cosine(WARMUP + (TOTAL - WARMUP) // 2, WARMUP, TOTAL) == pytest.approx(0.5)  # mid-way
    assert warmup_cosine(WARMUP + (TOTAL - WARMUP) // 4, WARMUP, TOTAL) == pytest.approx(0.5 + 0.5 * math.sqrt(0.5))
    for step in range(WARMUP, TOTAL + 1):
        assert warmup_cosine(step, WARMUP, TOTAL) == pytest.approx(_cosine(step), abs=1e-12)
    decay = [warmup_cosine(s, WARMUP, TOTAL) for s in range(WARMUP, TOTAL + 1)]
    assert all(a > b for a, b in itertools.pairwise(decay))  # strictly down to the end


def test_the_last_steps_reach_zero_and_stay_there() -> None:
    assert warmup_cosine(TOTAL - 1, WARMUP, TOTAL) == pytest.approx(_cosine(TOTAL - 1)) and _cosine(TOTAL - 1) > 0
    assert warmup_cosine(TOTAL, WARMUP, TOTAL) == pytest.approx(0.0, abs=1e-15)
    assert all(warmup_cosine(s, WARMUP, TOTAL) == warmup_cosine(TOTAL, WARMUP, TOTAL) for s in (TOTAL + 1, 10 * TOTAL))


def test_without_warm_up_the_decay_starts_at_one() -> None:
    assert warmup_cosine(0, 0, 4) == 1.0
    assert [warmup_cosine(s, 0, 4) for s in range(5)] == pytest.approx([_cosine(s, 0, 4) for s in range(5)])


def test_a_warm_up_as_long_as_the_run_never_divides_by_zero() -> None:
    assert warmup_cosine(4, 4, 4) == 1.0  # decay_steps is held at 1: progress 0 at the first step past warm-up
    assert warmup_cosine(5, 4, 4) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(3, 4, 2) == 1.0  # warm-up longer than the run still ends at 1
