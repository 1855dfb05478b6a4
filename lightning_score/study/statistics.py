"""What a study's numbers mean: bootstrap intervals over test images, paired across rows, and over seeds.

A study knows, for every row, seed and target domain, which test images the model got right: a 0/1 vector
``c[s, i]`` over the target's ``n`` test images (the same images, in the same order, for every row). From
these:

* **Cell** (row, target): the accuracy averaged over seeds, ``mean_s mean_i c[s, i]``; its standard deviation
  over seeds; and a 95 % percentile bootstrap interval over test images: ``B`` resamples of the target's
  images with replacement (counts ``w[b, i]``, summing to ``n``), ``acc_b = mean_s Σ_i w[b, i]·c[s, i] / n``.
* **Mean over targets**: the same, with every target's images resampled independently in each draw
  (resampling within each target domain), ``mean_t acc_b(t)``.
* **Paired difference** (row A − row B): every draw uses the SAME image counts for both rows (and for every
  row of the table: :func:`draw_resamples` makes them once), so what the two rows share (an easy or a hard
  image) cancels. Over images *and seeds*: each draw also picks the seeds with replacement (the same picks
  for both rows), so the interval covers the fine-tuning randomness as well as the choice of test images.
  A difference is *significant* when its 95 % interval excludes zero.

Everything here is plain numpy in float64: an always-right row has the interval [1, 1] exactly, and two
identical rows have a paired difference of exactly 0 in every draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Difference",
    "Estimate",
    "Resamples",
    "cell_estimate",
    "draw_resamples",
    "mean_estimate",
    "paired_difference",
    "percentile_interval",
]

LEVEL = 0.95


@dataclass(frozen=True)
class Resamples:
    """One set of bootstrap draws, shared by every row of a table (which makes the rows paired).

    Attributes:
        counts: Target domain -> ``[B, n]`` integer counts: how often draw ``b`` takes test image ``i``
            (each row sums to ``n``: ``n`` images drawn with replacement within that target).
        seeds: ``[B, S]`` indices of the seeds each draw takes, with replacement (paired comparisons only).
    """

    counts: dict[str, np.ndarray]
    seeds: np.ndarray

    @property
    def size(self) -> int:
        """The number of draws B."""
        return int(self.seeds.shape[0])


def draw_resamples(sizes: Mapping[str, int], num_seeds: int, resamples: int = 1000, seed: int = 0) -> Resamples:
    """Draw the bootstrap resamples of a study once, for every row.

    Args:
        sizes: Target domain -> its number of test images.
        num_seeds: How many seeds the study ran.
        resamples: The number of draws B.
        seed: Seeds the draws (the same seed gives the same intervals).

    Returns:
        The draws; targets are drawn in sorted order, so the result does not depend on the mapping's order.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be at least 1, got {num_seeds}.")
    rng = np.random.default_rng(seed)
    counts = {}
    for target in sorted(sizes):
        n = int(sizes[target])
        if n < 1:
            raise ValueError(f"Target '{target}' has no test images to resample.")
        counts[target] = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    seeds = rng.integers(0, num_seeds, size=(resamples, num_seeds))
    return Resamples(counts=counts, seeds=seeds)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap samples."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """An accuracy over seeds with its bootstrap interval (fractions in [0, 1]).

    Attributes:
        mean: The mean over seeds (of the per-seed accuracy, or of the per-seed mean over targets).
        std: The standard deviation over seeds (``ddof=1``; NaN with one seed).
        low: Lower end of the 95 % bootstrap interval over test images.
        high: Upper end.
        per_seed: The per-seed values, in seed order.
    """

    mean: float
    std: float
    low: float
    high: float
    per_seed: tuple[float, ...]


@dataclass(frozen=True)
class Difference:
    """A paired difference A − B (fractions), with its bootstrap interval over images and seeds.

    Attributes:
        mean: The mean over seeds (and targets, for the mean) of A − B.
        low: Lower end of the 95 % paired bootstrap interval.
        high: Upper end.
    """

    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low > 0.0 or self.high < 0.0


def _check(correct: np.ndarray, counts: np.ndarray) -> np.ndarray:
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2:
        raise ValueError(f"Expected per-seed correctness of shape [seeds, images], got {correct.shape}.")
    if correct.shape[1] != counts.shape[1]:
        raise ValueError(
            f"{correct.shape[1]} images in the correctness vectors but {counts.shape[1]} in the resamples: every row "
            "of a target must be evaluated on the same test images."
        )
    return correct


def _resampled(correct: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[S, B]`` accuracies of every seed in every draw."""
    return correct @ counts.T.astype(np.float64) / counts.shape[1]


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def cell_estimate(correct: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> Estimate:
    """One cell: the accuracy over seeds and its bootstrap interval over the target's test images.

    Args:
        correct: ``[S, n]`` 0/1 correctness of each seed's model on each test image.
        counts: The target's ``[B, n]`` resample counts (:attr:`Resamples.counts`).
        level: Interval coverage.
    """
    correct = _check(correct, counts)
    per_seed = correct.mean(axis=1)
    low, high = percentile_interval(_resampled(correct, counts).mean(axis=0), level)
    return Estimate(float(per_seed.mean()), _std(per_seed.tolist()), low, high, tuple(per_seed.tolist()))


def mean_estimate(correct: Mapping[str, np.ndarray], resamples: Resamples, level: float = LEVEL) -> Estimate:
    """The mean over targets: every target's images resampled within that target, in the same draws.

    Args:
        correct: Target -> ``[S, n_t]`` correctness (every target of the mean, the same seeds).
        resamples: The study's draws.
        level: Interval coverage.
    """
    if not correct:
        raise ValueError("No targets to average.")
    targets = sorted(correct)
    per_target = [_check(correct[t], resamples.counts[t]) for t in targets]
    per_seed = np.mean([c.mean(axis=1) for c in per_target], axis=0)
    draws = np.mean(
        [_resampled(c, resamples.counts[t]).mean(axis=0) for t, c in zip(targets, per_target, strict=True)], axis=0
    )
    low, high = percentile_interval(draws, level)
    return Estimate(float(per_seed.mean()), _std(per_seed.tolist()), low, high, tuple(per_seed.tolist()))


def paired_difference(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    resamples: Resamples,
    level: float = LEVEL,
    resample_seeds: bool = True,
) -> Difference:
    """A − B averaged over the given targets, with its paired bootstrap interval over images and seeds.

    Pass one target for a per-target difference, several for the difference of the means over targets.

    Args:
        a: Target -> ``[S, n_t]`` correctness of row A.
        b: Target -> ``[S, n_t]`` correctness of row B (the same targets, seeds and images).
        resamples: The study's draws (the same for both rows: that is the pairing).
        level: Interval coverage.
        resample_seeds: Also resample the seeds in each draw (with replacement, the same picks for A and B).
    """
    if sorted(a) != sorted(b) or not a:
        raise ValueError(f"Paired rows need the same targets; got {sorted(a)} and {sorted(b)}.")
    draws = []
    point = []
    for target in sorted(a):
        counts = resamples.counts[target]
        ca, cb = _check(a[target], counts), _check(b[target], counts)
        if ca.shape != cb.shape:
            raise ValueError(f"Target '{target}': rows have correctness of shapes {ca.shape} and {cb.shape}.")
        diff = _resampled(ca, counts) - _resampled(cb, counts)  # [S, B]
        point.append(float((ca.mean(axis=1) - cb.mean(axis=1)).mean()))
        if resample_seeds and diff.shape[0] > 1:
            if diff.shape[0] != resamples.seeds.shape[1]:
                raise ValueError(
                    f"Target '{target}': {diff.shape[0]} seeds, but the draws were made for {resamples.seeds.shape[1]}."
                )
            picks = resamples.seeds  # [B, S]: draw b averages diff[picks[b, k], b] over k
            draws.append(diff[picks, np.arange(diff.shape[1])[:, None]].mean(axis=1))
        else:
            draws.append(diff.mean(axis=0))
    low, high = percentile_interval(np.mean(draws, axis=0), level)
    return Difference(float(np.mean(point)), low, high)
