"""The study's outputs: results.json / results.csv with every number, results.md, and the figures."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_score.analysis import subspace_alignment
from lightning_score.study.config import Entry
from lightning_score.study.figures import accuracy_figure_inputs
from lightning_score.study.summary import MEAN, Summary, summarize
from lightning_score.study.tables import markdown_report, significance
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.environment import describe_environment
from lightning_score.utilities.files import atomic_write_text

__all__ = ["FIELDS", "write_report"]

log = logging.getLogger(__name__)

FIELDS = (
    "method", "section", "target", "seed", "acc", "balanced_acc", "acc_std", "ci_low", "ci_high", "normalized_acc",
    "diff_vs_reference", "diff_ci_low", "diff_ci_high", "diff_significant", "alpha", "merge_seconds",
    "peak_memory_mb", "sources",
)  # fmt: skip
"""results.csv's columns: per-seed lines (``seed`` = the seed) and aggregate lines (``seed`` = ``mean``)."""


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _aggregates(summary: Summary) -> list[dict[str, Any]]:
    """One line per table line and column (targets and the mean): everything the tables show, unrounded."""
    out = []
    for entry in summary.entries:
        for column in [*summary.targets, MEAN]:
            estimate = summary.cells.get((entry.name, column))
            if estimate is None:
                continue
            difference = summary.paired.get((entry.name, column))
            out.append(
                {
                    "method": entry.name,
                    "section": entry.section,
                    "target": column,
                    "seed": "mean",
                    "acc": estimate.mean,
                    "acc_std": _finite(estimate.std),
                    "ci_low": estimate.low,
                    "ci_high": estimate.high,
                    "per_seed": list(estimate.per_seed),
                    "normalized_acc": _finite(summary.normalized.get((entry.name, column))),
                    "diff_vs_reference": None if difference is None else difference.mean,
                    "diff_ci_low": None if difference is None else difference.low,
                    "diff_ci_high": None if difference is None else difference.high,
                    "diff_significant": None if difference is None else difference.significant,
                }
            )
    return out


def _csv(records: Sequence[Mapping[str, Any]], aggregates: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({**record, "sources": " ".join(record.get("sources") or [])})
    for line in aggregates:
        writer.writerow(line)
    return buffer.getvalue()


def write_report(
    records: Sequence[Mapping[str, Any]],
    entries: Sequence[Entry],
    targets: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
    *,
    resamples: int = 1000,
    settings: Mapping[str, Any] | None = None,
    experts: Mapping[str, Path] | None = None,
    title: str = "Leave-one-domain-out accuracy (%)",
    device: str = "cpu",
) -> tuple[dict[str, Path], Summary]:
    """Write results.json, results.csv, results.md and, with matplotlib, accuracy.png, sar.png and sar.json.

    results.json also records the machine and software of this process (``environment``: CPU, cores and threads,
    torch, its BLAS and LAPACK, Lightning, Python; :func:`~lightning_score.utilities.environment.describe_environment`).

    Args:
        records: One per table line, target and seed (see :mod:`lightning_score.study.evaluation`).
        entries: The table's lines, in order.
        targets: The target domains, in column order.
        seeds: The seeds.
        output_dir: The study folder.
        resamples: Bootstrap draws.
        settings: The study's resolved settings, recorded in results.json.
        experts: domain -> task-vector file, for the Subspace Alignment Ratio heat-map of the experts.
        title: Heading of results.md.
        device: Where to compute the SAR's SVDs.

    Returns:
        What was written, by name, and the summary the tables show.
    """
    summary = summarize(records, entries, targets, seeds, resamples=resamples)
    aggregates = _aggregates(summary)
    per_seed = [{k: v for k, v in r.items() if k != "correct"} for r in records]
    payload = {
        "settings": dict(settings or {}),
        "seeds": list(seeds),
        "targets": list(targets),
        "methods": [{"name": e.name, "section": e.section, "row": e.row.name, "tuned": e.tuned} for e in entries],
        "reference": summary.reference,
        "bootstrap_resamples": resamples,
        "significance": significance(summary),
        "records": per_seed,
        "aggregates": aggregates,
        "environment": describe_environment(),  # where this report was computed: what reproducing it bit for bit needs
    }
    written: dict[str, Path] = {}
    written["results.json"] = atomic_write_text(output_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    written["results.csv"] = atomic_write_text(output_dir / "results.csv", _csv(per_seed, aggregates))
    written["results.md"] = atomic_write_text(output_dir / "results.md", markdown_report(summary, title))
    try:
        from lightning_score.plots import plot_method_accuracy, plot_subspace_alignment
    except ImportError as error:  # the plot extra is optional
        log.warning("%s: results.md/csv/json are written; install lightning-score[plot] for the figures.", error)
        return written, summary
    figure = accuracy_figure_inputs(summary, entries, targets)  # error bars: bootstrap (1 seed) or ± std (seeds)
    if figure.table:
        written["accuracy.png"] = plot_method_accuracy(
            figure.table,
            output_dir / "accuracy.png",
            exclude_from_best=[e.name for e in entries if e.section == "reference"],
            intervals=figure.intervals,
            domain_intervals=figure.domain_intervals,
            interval_label=figure.label,
            title="Mean accuracy over held-out domains",  # the legend says what the error bars are
        )
    if experts:
        sar = subspace_alignment([TaskVector.load(p) for p in experts.values()], device=device)
        written["sar.json"] = atomic_write_text(output_dir / "sar.json", json.dumps(sar.to_dict(), indent=2) + "\n")
        written["sar.png"] = plot_subspace_alignment(sar, output_dir / "sar.png")
    return written, summary
