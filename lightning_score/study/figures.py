"""What ``accuracy.png`` draws from a study's summary: each line's mean and per-target accuracy with error bars.

The error bars are, per cell (line × target) and for the mean over targets:

* with one seed, the 95 % percentile bootstrap interval over the target's test images (the interval the
  tables give, :mod:`.statistics`);
* with several seeds, the mean ± the standard deviation over seeds (the spread the tables give as ``±``),
  since the seeds' spread is then the variation a rerun shows.

The legend says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_score.study.config import Entry
from lightning_score.study.statistics import Estimate
from lightning_score.study.summary import MEAN, Summary

__all__ = ["AccuracyFigure", "accuracy_figure_inputs"]


@dataclass
class AccuracyFigure:
    """The arguments of :func:`~lightning_score.plots.plot_method_accuracy` for a study (fractions).

    Attributes:
        table: Line name -> {target: accuracy, ``"mean"``: mean over targets}.
        intervals: Line name -> (low, high) of the mean over targets.
        domain_intervals: Line name -> {target: (low, high)} of each cell.
        label: What the error bars are (for the legend and title).
    """

    table: dict[str, dict[str, float]] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    domain_intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    label: str = ""


def _bar(estimate: Estimate, by_std: bool) -> tuple[float, float] | None:
    if not by_std:
        return (estimate.low, estimate.high)
    if not math.isfinite(estimate.std):
        return None
    return (estimate.mean - estimate.std, estimate.mean + estimate.std)


def accuracy_figure_inputs(summary: Summary, entries: Sequence[Entry], targets: Sequence[str]) -> AccuracyFigure:
    """The table and error bars of ``accuracy.png``: lines with a mean over every target, in table order."""
    by_std = len(summary.seeds) > 1
    figure = AccuracyFigure(
        label=f"± std over {len(summary.seeds)} seeds" if by_std else "95 % bootstrap interval over test images"
    )
    for entry in entries:
        mean = summary.cells.get((entry.name, MEAN))
        if mean is None:
            continue
        cells = {t: summary.cells[(entry.name, t)] for t in targets if (entry.name, t) in summary.cells}
        figure.table[entry.name] = {**{t: c.mean for t, c in cells.items()}, "mean": mean.mean}
        bar = _bar(mean, by_std)
        if bar is not None:
            figure.intervals[entry.name] = bar
        bars = {t: _bar(c, by_std) for t, c in cells.items()}
        figure.domain_intervals[entry.name] = {t: b for t, b in bars.items() if b is not None}
    return figure
