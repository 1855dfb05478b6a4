"""The study's bootstrap: known cases, a plain-loop float64 reference, pairing across rows, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_score.study.statistics import (
    Resamples,
    cell_estimate,
    draw_resamples,
    mean_estimate,
    paired_difference,
    percentile_interval,
)


def _reference_quantile(values: list[float], q: float) -> float:
    """numpy's default ('linear') quantile, written out: position q·(B−1) in the sorted draws."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _reference_cell(correct: list[list[int]], counts: np.ndarray) -> tuple[float, float, float]:
    """Plain loops: per draw, the seeds' mean of the count-weighted accuracy."""
    seeds, n = len(correct), len(correct[0])
    draws = []
    for b in range(counts.shape[0]):
        total = 0.0
        for s in range(seeds):
            total += sum(int(counts[b, i]) * correct[s][i] for i in range(n)) / n
        draws.append(total / seeds)
    mean = sum(sum(row) / n for row in correct) / seeds
    return mean, _reference_quantile(draws, 0.025), _reference_quantile(draws, 0.975)


def test_resamples_draw_each_targets_images_with_replacement() -> None:
    draws = draw_resamples({"b": 7, "a": 5}, num_seeds=3, resamples=400, seed=1)
    assert draws.size == 400 and draws.seeds.shape == (400, 3) and set(np.unique(draws.seeds)) == {0, 1, 2}
    for target, n in (("a", 5), ("b", 7)):
        counts = draws.counts[target]
        assert counts.shape == (400, n) and (counts.sum(axis=1) == n).all() and counts.min() >= 0
        assert np.abs(counts.mean(axis=0) - 1.0).max() < 0.2  # every image equally likely
        assert (counts == 0).any() and (counts >= 2).any()  # with replacement: some images drawn twice, some never
    again = draw_resamples({"a": 5, "b": 7}, num_seeds=3, resamples=400, seed=1)  # mapping order does not matter
    assert all(np.array_equal(draws.counts[t], again.counts[t]) for t in ("a", "b"))
    assert np.array_equal(draws.seeds, again.seeds)
    other = draw_resamples({"a": 5, "b": 7}, num_seeds=3, resamples=400, seed=2)
    assert not np.array_equal(draws.counts["a"], other.counts["a"])
    with pytest.raises(ValueError, match="at least 1"):
        draw_resamples({"a": 5}, num_seeds=1, resamples=0)
    with pytest.raises(ValueError, match="no test images"):
        draw_resamples({"a": 0}, num_seeds=1)


def test_an_always_right_row_has_the_interval_100_100_and_an_always_wrong_one_0_0() -> None:
    draws = draw_resamples({"t": 300, "u": 50}, num_seeds=2, resamples=500)
    right = {"t": np.ones((2, 300)), "u": np.ones((2, 50))}
    cell = cell_estimate(right["t"], draws.counts["t"])
    assert (cell.mean, cell.low, cell.high) == (1.0, 1.0, 1.0) and cell.std == 0.0
    mean = mean_estimate(right, draws)
    assert (mean.mean, mean.low, mean.high) == (1.0, 1.0, 1.0)
    wrong = cell_estimate(np.zeros((2, 300)), draws.counts["t"])
    assert (wrong.mean, wrong.low, wrong.high) == (0.0, 0.0, 0.0)


def test_two_identical_rows_differ_by_exactly_zero_in_every_draw() -> None:
    rng = np.random.default_rng(0)
    row = {"t": (rng.random((3, 200)) < 0.7).astype(float), "u": (rng.random((3, 80)) < 0.4).astype(float)}
    draws = draw_resamples({"t": 200, "u": 80}, num_seeds=3, resamples=300)
    for targets in (["t"], ["u"], ["t", "u"]):
        a = {t: row[t] for t in targets}
        difference = paired_difference(a, {t: v.copy() for t, v in a.items()}, draws)
        assert (difference.mean, difference.low, difference.high) == (0.0, 0.0, 0.0)
        assert not difference.significant


def test_cell_matches_a_plain_loop_reference() -> None:
    rng = np.random.default_rng(3)
    correct = (rng.random((2, 40)) < 0.6).astype(int)
    draws = draw_resamples({"t": 40}, num_seeds=2, resamples=250, seed=5)
    estimate = cell_estimate(correct, draws.counts["t"])
    mean, low, high = _reference_cell(correct.tolist(), draws.counts["t"])
    assert estimate.mean == pytest.approx(mean, abs=1e-12)
    assert estimate.low == pytest.approx(low, abs=1e-12) and estimate.high == pytest.approx(high, abs=1e-12)
    per_seed = correct.mean(axis=1)
    assert estimate.per_seed == pytest.approx(tuple(per_seed)) and estimate.std == pytest.approx(
        np.std(per_seed, ddof=1)
    )
    one_seed = cell_estimate(correct[:1], draws.counts["t"])
    assert math.isnan(one_seed.std)


def test_mean_over_targets_resamples_within_each_target() -> None:
    """Draw b averages target t's accuracy under t's own counts: matches a loop over targets and images."""
    rng = np.random.default_rng(4)
    correct = {"t": (rng.random((1, 30)) < 0.9).astype(int), "u": (rng.random((1, 20)) < 0.3).astype(int)}
    draws = draw_resamples({"t": 30, "u": 20}, num_seeds=1, resamples=200, seed=9)
    values = []
    for b in range(200):
        per_target = [
            sum(int(draws.counts[t][b, i]) * correct[t][0][i] for i in range(len(correct[t][0]))) / len(correct[t][0])
            for t in ("t", "u")
        ]
        values.append(sum(per_target) / 2)
    estimate = mean_estimate(correct, draws)
    assert estimate.mean == pytest.approx((correct["t"].mean() + correct["u"].mean()) / 2)
    assert estimate.low == pytest.approx(_reference_quantile(values, 0.025), abs=1e-12)
    assert estimate.high == pytest.approx(_reference_quantile(values, 0.975), abs=1e-12)


def test_paired_difference_matches_a_plain_loop_over_shared_images_and_seeds() -> None:
    rng = np.random.default_rng(6)
    a = (rng.random((3, 25)) < 0.7).astype(int)
    b = (rng.random((3, 25)) < 0.5).astype(int)
    draws = draw_resamples({"t": 25}, num_seeds=3, resamples=150, seed=2)
    values = []
    for k in range(150):
        seeds = draws.seeds[k]  # the same seed picks for both rows
        total = 0.0
        for s in seeds:
            total += sum(int(draws.counts["t"][k, i]) * (a[s][i] - b[s][i]) for i in range(25)) / 25
        values.append(total / len(seeds))
    difference = paired_difference({"t": a}, {"t": b}, draws)
    assert difference.mean == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert difference.low == pytest.approx(_reference_quantile(values, 0.025), abs=1e-12)
    assert difference.high == pytest.approx(_reference_quantile(values, 0.975), abs=1e-12)
    images_only = paired_difference({"t": a}, {"t": b}, draws, resample_seeds=False)
    assert images_only.mean == difference.mean and (images_only.low, images_only.high) != (
        difference.low,
        difference.high,
    )


def test_pairing_narrows_the_interval_of_rows_that_share_their_hard_images() -> None:
    """Two rows right on nearly the same images: their paired difference is tight, their separate intervals wide."""
    rng = np.random.default_rng(7)
    a = (rng.random((1, 1000)) < 0.75).astype(float)
    b = a.copy()
    flip = rng.choice(1000, size=30, replace=False)
    b[0, flip[:20]] = 0.0  # b misses 20 images a gets, and gets 10 that a misses
    b[0, flip[20:]] = 1.0
    draws = draw_resamples({"t": 1000}, num_seeds=1, resamples=1000, seed=0)
    paired = paired_difference({"t": a}, {"t": b}, draws)
    cell_a = cell_estimate(a, draws.counts["t"])
    assert paired.high - paired.low < 0.5 * (cell_a.high - cell_a.low)
    unpaired = draw_resamples({"t": 1000}, num_seeds=1, resamples=1000, seed=1)  # b resampled independently
    independent = cell_a.mean - b @ unpaired.counts["t"].T[:, :] / 1000  # [1, B]
    width_unpaired = np.subtract(*np.quantile((a @ draws.counts["t"].T / 1000) - independent, [0.975, 0.025]))
    assert paired.high - paired.low < 0.5 * width_unpaired


def test_interval_width_of_a_binomial_cell() -> None:
    """1,000 images at 80 %: the 95 % interval is about ±1.96·sqrt(0.16/1000) = ±2.5 points."""
    rng = np.random.default_rng(8)
    correct = np.zeros((1, 1000))
    correct[0, rng.choice(1000, size=800, replace=False)] = 1.0
    cell = cell_estimate(correct, draw_resamples({"t": 1000}, 1, 2000, seed=3).counts["t"])
    half = (cell.high - cell.low) / 2
    assert cell.mean == 0.8 and 0.022 < half < 0.028 and cell.low < 0.8 < cell.high


def test_shape_errors_name_the_problem() -> None:
    draws = draw_resamples({"t": 10}, num_seeds=2, resamples=20)
    with pytest.raises(ValueError, match="same test images"):
        cell_estimate(np.ones((2, 9)), draws.counts["t"])
    with pytest.raises(ValueError, match=r"\[seeds, images\]"):
        cell_estimate(np.ones(10), draws.counts["t"])
    with pytest.raises(ValueError, match="same targets"):
        paired_difference({"t": np.ones((2, 10))}, {"u": np.ones((2, 10))}, draws)
    with pytest.raises(ValueError, match="draws were made for"):
        paired_difference({"t": np.ones((3, 10))}, {"t": np.ones((3, 10))}, draws)
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert isinstance(draws, Resamples)
