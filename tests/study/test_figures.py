"""accuracy.png's inputs: each line with a mean over every target, in table order; bootstrap or ± std error bars."""

from __future__ import annotations

import math

import pytest

from lightning_score.study.config import Row, table_entries
from lightning_score.study.figures import accuracy_figure_inputs
from lightning_score.study.statistics import Estimate
from lightning_score.study.summary import MEAN, Summary

ROWS = [Row("SCORE"), Row("TIES", method="ties"), Row("Zero-shot", mode="zeroshot")]
TARGETS = ["a", "b"]


def _summary(seeds: list[int], cells: dict[tuple[str, str], Estimate]) -> Summary:
    return Summary(table_entries(ROWS, tune_alpha=False), TARGETS, seeds, cells=cells)


def _cell(mean: float, std: float = 0.02) -> Estimate:
    return Estimate(mean=mean, std=std, low=mean - 0.05, high=mean + 0.04, per_seed=(mean,))


def test_one_seed_draws_the_bootstrap_interval_of_every_cell_and_mean() -> None:
    cells = {(name, column): _cell(value + 0.1 * i) for i, (name, value) in enumerate([("SCORE", 0.6), ("TIES", 0.5),
             ("Zero-shot", 0.3)]) for column in [*TARGETS, MEAN]}  # fmt: skip
    figure = accuracy_figure_inputs(_summary([0], cells), table_entries(ROWS, False), TARGETS)
    assert list(figure.table) == ["SCORE", "TIES", "Zero-shot"]  # table order
    assert figure.table["TIES"] == pytest.approx({"a": 0.6, "b": 0.6, "mean": 0.6})
    assert figure.intervals["SCORE"] == pytest.approx((0.55, 0.64))  # (low, high) of the mean over targets
    bars = figure.domain_intervals["Zero-shot"]
    assert list(bars) == TARGETS and all(bar == pytest.approx((0.45, 0.54)) for bar in bars.values())
    assert figure.label == "95 % bootstrap interval over test images"


def test_several_seeds_draw_the_spread_over_seeds_and_skip_incomplete_lines() -> None:
    cells = {
        ("SCORE", "a"): _cell(0.6, std=0.01),
        ("SCORE", "b"): _cell(0.8, std=math.nan),  # no spread to draw: the cell has no bar
        ("SCORE", MEAN): _cell(0.7, std=0.03),
        ("TIES", "a"): _cell(0.5),  # no mean over every target (a missing evaluation): not drawn at all
        ("Zero-shot", "a"): _cell(0.3),
        ("Zero-shot", MEAN): _cell(0.3, std=math.nan),
    }
    figure = accuracy_figure_inputs(_summary([0, 1, 2], cells), table_entries(ROWS, False), TARGETS)
    assert figure.label == "± std over 3 seeds"
    assert list(figure.table) == ["SCORE", "Zero-shot"]
    assert figure.table["SCORE"] == pytest.approx({"a": 0.6, "b": 0.8, "mean": 0.7})
    assert figure.table["Zero-shot"] == pytest.approx({"a": 0.3, "mean": 0.3})  # only the cells there are
    assert figure.intervals["SCORE"] == pytest.approx((0.67, 0.73))  # mean ± std
    assert "Zero-shot" not in figure.intervals  # NaN std: no bar
    assert list(figure.domain_intervals["SCORE"]) == ["a"]  # b's NaN std: no bar
    assert figure.domain_intervals["SCORE"]["a"] == pytest.approx((0.59, 0.61))
