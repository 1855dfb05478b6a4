"""The study's outputs: results.csv / results.json, the paper-style results.md, and the figures."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_score.atomic import atomic_write_text
from lightning_score.study.config import Row

__all__ = ["markdown_table", "write_report"]

log = logging.getLogger(__name__)

FIELDS = ("method", "mode", "target", "acc", "balanced_acc", "merge_seconds", "peak_memory_mb", "alpha", "sources")


def _accuracy_table(records: Sequence[Mapping[str, Any]], key: str = "acc") -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for record in records:
        table.setdefault(record["method"], {})[record["target"]] = record[key]
    return table


def markdown_table(records: Sequence[Mapping[str, Any]], rows: Sequence[Row], targets: Sequence[str]) -> str:
    """Methods as rows, target domains as columns, the mean last; the best weight merge per column in bold.

    Accuracies are top-1, in percent. Reference rows (zero-shot, logit ensemble, the target's own expert)
    follow the merges and are not ranked: the ensemble costs T forward passes and the expert saw the
    target domain.
    """
    table = _accuracy_table(records)
    columns = [*targets, "Mean"]
    for values in table.values():
        present = [values[t] for t in targets if t in values]
        values["Mean"] = sum(present) / len(present) if len(present) == len(targets) else float("nan")
    merges = [row.name for row in rows if not row.is_reference and row.name in table]
    best = {
        column: max((table[name][column] for name in merges if column in table[name]), default=None)
        for column in columns
    }
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        if row.name not in table:
            continue
        cells = []
        for column in columns:
            value = table[row.name].get(column)
            text = "–" if value is None or value != value else f"{100 * value:.2f}"
            if not row.is_reference and value is not None and best[column] is not None and value == best[column]:
                text = f"**{text}**"
            cells.append(text)
        label = f"*{row.name}*" if row.is_reference else row.name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    records: Sequence[Mapping[str, Any]],
    rows: Sequence[Row],
    targets: Sequence[str],
    output_dir: Path,
    *,
    experts: Mapping[str, Path] | None = None,
    title: str = "Leave-one-domain-out accuracy (%)",
    device: str = "cpu",
) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and, with matplotlib, accuracy.png and sar.png.

    Args:
        records: One record per row and target (see :class:`~lightning_score.study.runner.Study`).
        rows: The rows, in table order.
        targets: The target domains, in column order.
        output_dir: The study folder.
        experts: domain -> task-vector file, for the Subspace Alignment Ratio heat-map of the experts.
        title: Heading of results.md.
        device: Where to compute the SAR's SVDs.

    Returns:
        What was written, by name.
    """
    written: dict[str, Path] = {}
    written["results.json"] = atomic_write_text(output_dir / "results.json", json.dumps(list(records), indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({**record, "sources": " ".join(record.get("sources") or [])})
    written["results.csv"] = atomic_write_text(output_dir / "results.csv", buffer.getvalue())
    note = (
        "\nTop-1 accuracy on each held-out target domain, merging the other domains' experts at α = 1. "
        "Best weight merge per column in **bold**; reference rows in *italics* are not ranked (the logit "
        "ensemble runs every expert; the expert row is the target domain's own fine-tuned model, an upper bound).\n"
    )
    written["results.md"] = atomic_write_text(
        output_dir / "results.md", f"# {title}\n\n" + markdown_table(records, rows, targets) + note
    )
    try:
        from lightning_score.plots import plot_method_accuracy, plot_subspace_alignment
    except ImportError as error:  # the plot extra is optional
        log.warning("%s: results.md/csv/json are written; install lightning-score[plot] for the figures.", error)
        return written
    table = {row.name: _accuracy_table(records).get(row.name, {}) for row in rows}
    reference = [row.name for row in rows if row.is_reference]
    written["accuracy.png"] = plot_method_accuracy(
        {name: values for name, values in table.items() if values},
        output_dir / "accuracy.png",
        exclude_from_best=reference,
        title="Mean accuracy over held-out domains",
    )
    if experts:
        from lightning_score.analysis import subspace_alignment
        from lightning_score.task_vector import TaskVector

        sar = subspace_alignment([TaskVector.load(p) for p in experts.values()], device=device)
        atomic_write_text(output_dir / "sar.json", json.dumps(sar.to_dict(), indent=2) + "\n")
        written["sar.png"] = plot_subspace_alignment(sar, output_dir / "sar.png")
    return written
