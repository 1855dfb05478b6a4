"""From a study's per-seed records to its tables' numbers: means, spreads, intervals, paired differences.

:func:`summarize` gathers each table line's per-image correctness for every target and seed, draws the
bootstrap resamples once (:func:`~lightning_score.study.statistics.draw_resamples`, the same draws for every
line: the lines are paired) and computes, per cell and for the mean over targets, the accuracy over seeds
with its spread and 95 % interval, the normalized accuracy, and the paired difference against SCORE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_score.study.config import Entry
from lightning_score.study.evaluation import unpack_correct
from lightning_score.study.statistics import (
    Difference,
    Estimate,
    cell_estimate,
    draw_resamples,
    mean_estimate,
    paired_difference,
)

__all__ = ["MEAN", "Summary", "summarize"]

MEAN = "Mean"
"""The column of the mean over targets."""


@dataclass
class Summary:
    """The numbers of a study's tables (accuracies as fractions).

    Attributes:
        entries: The table's lines, in order.
        targets: The target domains, in column order.
        seeds: The seeds.
        cells: (line name, target or ``"Mean"``) -> accuracy over seeds with its interval.
        normalized: (line name, target or ``"Mean"``) -> (acc − zero-shot) / (target expert − zero-shot).
        paired: (line name, target or ``"Mean"``) -> reference − line, with its paired interval.
        reference: The line the paired differences are taken against (SCORE), if any.
        alphas: (line name, target) -> the α of each seed.
        resamples: The number of bootstrap draws.
    """

    entries: list[Entry]
    targets: list[str]
    seeds: list[int]
    cells: dict[tuple[str, str], Estimate] = field(default_factory=dict)
    normalized: dict[tuple[str, str], float] = field(default_factory=dict)
    paired: dict[tuple[str, str], Difference] = field(default_factory=dict)
    reference: str | None = None
    alphas: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    resamples: int = 0


def _reference(entries: Sequence[Entry]) -> str | None:
    """SCORE at the paper's settings: the first plain (not tuned) ``score`` merge without options."""
    for entry in entries:
        row = entry.row
        if row.mode == "merge" and row.method == "score" and not row.options and not entry.tuned and row.alpha == 1:
            return entry.name
    return None


def _correctness(
    records: Sequence[Mapping[str, Any]], seeds: Sequence[int]
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, int]]:
    """(line, target) -> [S, n] correctness over every seed (cells missing a seed are left out); n per target."""
    by_cell: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    digests: dict[str, tuple[str, int]] = {}
    for record in records:
        target, count = record["target"], int(record["num_images"])
        digest = (record["labels_digest"], count)
        if digests.setdefault(target, digest) != digest:
            raise ValueError(
                f"Rows tested on '{target}' saw different test images ({record['method']}, seed {record['seed']}): the "
                "study folder mixes results of different data. Rerun with --restart true or a new output_dir."
            )
        by_cell.setdefault((record["method"], target), {})[record["seed"]] = unpack_correct(record["correct"], count)
    complete = {
        cell: np.stack([per_seed[s] for s in seeds]).astype(np.float64)
        for cell, per_seed in by_cell.items()
        if all(s in per_seed for s in seeds)
    }
    return complete, {target: count for target, (_, count) in digests.items()}


def summarize(
    records: Sequence[Mapping[str, Any]],
    entries: Sequence[Entry],
    targets: Sequence[str],
    seeds: Sequence[int],
    resamples: int = 1000,
    bootstrap_seed: int = 0,
) -> Summary:
    """Compute every number of the tables from the per-seed records.

    Args:
        records: One per line, target and seed, with packed per-image correctness (see :mod:`.evaluation`).
        entries: The table's lines.
        targets: The target domains.
        seeds: The seeds (every cell averages over all of them; a cell missing one is left empty).
        resamples: Bootstrap draws.
        bootstrap_seed: Seeds the draws.
    """
    summary = Summary(list(entries), list(targets), list(seeds), resamples=resamples)
    correct, sizes = _correctness(records, seeds)
    for record in records:
        summary.alphas.setdefault((record["method"], record["target"]), []).append(record.get("alpha"))
    if not sizes:
        return summary
    draws = draw_resamples({t: sizes[t] for t in targets if t in sizes}, len(seeds), resamples, bootstrap_seed)
    full: dict[str, dict[str, np.ndarray]] = {}
    for entry in entries:
        per_target = {t: correct[(entry.name, t)] for t in targets if (entry.name, t) in correct}
        for target, values in per_target.items():
            summary.cells[(entry.name, target)] = cell_estimate(values, draws.counts[target])
        if len(per_target) == len(targets):
            full[entry.name] = per_target
            summary.cells[(entry.name, MEAN)] = mean_estimate(per_target, draws)
    _normalize(summary, entries, targets)
    summary.reference = _reference(entries)
    if summary.reference in full:
        ref = full[summary.reference]
        for name, per_target in full.items():
            if name == summary.reference:
                continue
            for target in targets:
                summary.paired[(name, target)] = paired_difference(
                    {target: ref[target]}, {target: per_target[target]}, draws
                )
            summary.paired[(name, MEAN)] = paired_difference(ref, per_target, draws)
    return summary


def _normalize(summary: Summary, entries: Sequence[Entry], targets: Sequence[str]) -> None:
    """(acc − zero-shot) / (expert − zero-shot) per target; for the mean, the same ratio of the means over targets."""
    zero_shot = next((e.name for e in entries if e.row.mode == "zeroshot"), None)
    expert = next((e.name for e in entries if e.row.mode == "expert"), None)
    if zero_shot is None or expert is None:
        return
    for entry in entries:
        for column in [*targets, MEAN]:
            cells = [summary.cells.get((name, column)) for name in (entry.name, zero_shot, expert)]
            if any(cell is None for cell in cells):
                continue
            acc, zs, ex = (cell.mean for cell in cells)  # type: ignore[union-attr]
            summary.normalized[(entry.name, column)] = (acc - zs) / (ex - zs) if ex != zs else math.nan
