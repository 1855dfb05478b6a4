"""The study's results.md: the main table by section, its intervals, the paired comparison, normalized accuracy, α.

Every table has the lines as rows and the target domains as columns, the mean over targets last. Lines are
grouped into sections (data-free merges; merges that use data; references) and ranked only within a
section: the best merge of a section per column is in **bold**; references are in *italics* and not ranked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lightning_score.study.config import SECTIONS, Entry
from lightning_score.study.summary import MEAN, Summary

__all__ = ["markdown_report", "significance"]

Cell = Callable[[str, str], str]


def _pct(value: float, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _table(summary: Summary, cell: Cell, columns: Sequence[str], bold: bool, entries: Sequence[Entry]) -> list[str]:
    """Section header lines, then one line per entry; the best of each merge section per column in bold."""
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for section, title in SECTIONS.items():
        members = [e for e in entries if e.section == section]
        if not members:
            continue
        lines.append(f"| **{title}** |" + " |" * len(columns))
        best: dict[str, float] = {}
        if bold and section != "reference":
            for column in columns:
                values = [summary.cells[(e.name, column)].mean for e in members if (e.name, column) in summary.cells]
                if values:
                    best[column] = max(values)
        for entry in members:
            texts = []
            for column in columns:
                text = cell(entry.name, column)
                estimate = summary.cells.get((entry.name, column))
                if estimate is not None and column in best and estimate.mean == best[column]:
                    text = f"**{text}**"
                texts.append(text)
            label = f"*{entry.name}*" if section == "reference" else entry.name
            lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return lines


def _accuracy(summary: Summary) -> Cell:
    def cell(name: str, column: str) -> str:
        estimate = summary.cells.get((name, column))
        if estimate is None:
            return "–"
        spread = f" ± {_pct(estimate.std)}" if len(summary.seeds) > 1 else ""
        return _pct(estimate.mean) + spread

    return cell


def _interval(summary: Summary, digits: int = 1) -> Cell:
    def cell(name: str, column: str) -> str:
        estimate = summary.cells.get((name, column))
        return "–" if estimate is None else f"[{_pct(estimate.low, digits)}, {_pct(estimate.high, digits)}]"

    return cell


def _difference(summary: Summary) -> Cell:
    def cell(name: str, column: str) -> str:
        if name == summary.reference:
            return "(reference)" if column == MEAN else ""
        difference = summary.paired.get((name, column))
        if difference is None:
            return "–"
        mark = " †" if difference.significant else ""
        text = f"{100 * difference.mean:+.2f}"
        if column == MEAN:
            text += f" [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]"
        return text + mark

    return cell


def _normalized(summary: Summary) -> Cell:
    def cell(name: str, column: str) -> str:
        value = summary.normalized.get((name, column))
        return "–" if value is None or not math.isfinite(value) else f"{value:.2f}"

    return cell


def _alphas(summary: Summary) -> Cell:
    def cell(name: str, column: str) -> str:
        values = summary.alphas.get((name, column))
        return "–" if not values else ", ".join(f"{float(a):g}" for a in values)

    return cell


def significance(summary: Summary) -> list[str]:
    """Sentences saying which lines differ significantly from the reference (SCORE) on the mean over targets."""
    if summary.reference is None:
        return []
    better, worse, same = [], [], []
    for entry in summary.entries:
        difference = summary.paired.get((entry.name, MEAN))
        if difference is None:
            continue
        label = f"{entry.name} ({100 * (0.0 - difference.mean):+.2f} points)"  # method − reference
        if not difference.significant:
            same.append(label)
        else:
            (worse if difference.mean > 0 else better).append(label)
    ref = summary.reference
    out = []
    if worse:
        out.append(f"{ref} is significantly more accurate than: " + "; ".join(worse) + ".")
    if better:
        out.append(f"Significantly more accurate than {ref}: " + "; ".join(better) + ".")
    if same:
        out.append(f"Not significantly different from {ref}: " + "; ".join(same) + ".")
    return out


def markdown_report(summary: Summary, title: str = "Leave-one-domain-out accuracy (%)") -> str:
    """The whole results.md."""
    entries = summary.entries
    columns = [*summary.targets, MEAN]
    seeds = ", ".join(map(str, summary.seeds))
    count = f"{len(summary.seeds)} seed{'s' if len(summary.seeds) > 1 else ''} ({seeds})"
    spread = "mean ± standard deviation over " + count if len(summary.seeds) > 1 else "one seed (" + seeds + ")"
    parts = [
        f"# {title}\n",
        f"Top-1 accuracy on each held-out target domain, merging the other domains' experts; {spread}. "
        "Best merge per section and column in **bold**; references in *italics*, not ranked (the logit ensemble "
        "runs every source expert; the pooled fine-tune trains one model on all source domains; the expert row is "
        "the target's own fine-tuned model, an upper bound). Last column: the 95 % bootstrap interval of the mean "
        f"over targets ({summary.resamples} resamples of each target's test images).\n",
    ]
    mean_ci = _interval(summary)
    main = _table(summary, lambda n, c: mean_ci(n, MEAN) if c == "Mean 95 % CI" else _accuracy(summary)(n, c),
                  [*columns, "Mean 95 % CI"], True, entries)  # fmt: skip
    parts += ["\n".join(main) + "\n"]
    parts += [
        "## 95 % bootstrap intervals\n",
        "Percentile intervals over each target's test images (resampled within the target, the same resamples "
        "for every row), of the accuracy averaged over seeds.\n",
        "\n".join(_table(summary, _interval(summary), columns, False, entries)) + "\n",
    ]
    if summary.reference is not None and summary.paired:
        parts += [
            f"## Paired differences: {summary.reference} − method (points)\n",
            f"Positive: {summary.reference} is more accurate. Mean over seeds (and targets, last column) with its "
            "95 % paired bootstrap interval: the same resampled images and seeds for both rows. † marks a "
            "difference whose interval excludes zero (no correction for multiple comparisons).\n",
            "\n".join(_table(summary, _difference(summary), columns, False, entries)) + "\n",
            "\n".join(significance(summary)) + "\n",
        ]
    if summary.normalized:
        parts += [
            "## Normalized accuracy\n",
            "(accuracy − zero-shot) / (target expert − zero-shot), of the seed means: 0 is the pre-trained model, 1 "
            "the target's own expert. Mean column: the same ratio of the means over targets. Unstable where the "
            "expert barely beats zero-shot.\n",
            "\n".join(_table(summary, _normalized(summary), columns, False, entries)) + "\n",
        ]
    tuned = [e for e in entries if e.tuned or e.row.alpha == "auto"]
    if tuned:
        parts += [
            "## α chosen on the source domains' validation data (one value per seed)\n",
            "\n".join(_table(summary, _alphas(summary), summary.targets, False, tuned)) + "\n",
        ]
    return "\n".join(parts)
