"""Mean accuracy per merge method: bars and per-domain dots, each with optional error bars, the best highlighted."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_score.plots.common import new_figure, save_png, task_colours

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["method_accuracy_figure", "plot_method_accuracy"]


def _accuracy_rows(
    table: Mapping[str, float | Mapping[str, float]],
) -> tuple[list[str], list[float], dict[str, dict[str, float]]]:
    """Method names, mean accuracies and per-domain values from the flexible table format."""
    if not isinstance(table, Mapping) or not table:
        raise ValueError(
            "plot_method_accuracy takes a non-empty mapping method -> mean accuracy (or method -> "
            "{domain: accuracy}), e.g. {'score': 65.7, 'tsv': 64.9}."
        )
    methods, means, per_domain = [], [], {}
    for method, value in table.items():
        if isinstance(value, Mapping):
            domains = {str(d): float(a) for d, a in value.items() if d != "mean"}
            if "mean" in value:
                mean = float(value["mean"])
            elif domains:
                finite = [a for a in domains.values() if math.isfinite(a)]
                mean = sum(finite) / len(finite) if finite else math.nan
            else:
                raise ValueError(f"Method '{method}' has an empty mapping of per-domain accuracies.")
            per_domain[str(method)] = domains
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            mean = float(value)
        else:
            raise ValueError(
                f"Method '{method}' has accuracy {value!r}: expected a number or a mapping domain -> accuracy."
            )
        methods.append(str(method))
        means.append(mean)
    return methods, means, per_domain


def _interval_ends(
    methods: list[str],
    means: list[float],
    intervals: Mapping[str, tuple[float, float]],
    scale: float,
    what: str = "intervals",
    domain: str | None = None,
) -> dict[int, tuple[float, float]]:
    """Row index -> (low, high) in drawn units, for the methods that have an interval (of ``domain``'s cell)."""
    unknown = sorted(set(intervals) - set(methods))
    if unknown:
        raise ValueError(f"{what} name methods that are not in the table: {unknown}.")
    ends = {}
    for i, method in enumerate(methods):
        if method not in intervals or not math.isfinite(means[i]):
            continue
        low, high = (float(v) * scale for v in intervals[method])
        if not low - 1e-9 <= means[i] <= high + 1e-9:
            cell = f"'{method}' on '{domain}'" if domain else f"'{method}'"
            noun = "value" if domain else "mean"
            raise ValueError(f"The interval of {cell} ({low:g}, {high:g}) does not contain its {noun} {means[i]:g}.")
        ends[i] = (low, high)
    return ends


def _domain_ends(
    methods: list[str],
    per_domain: Mapping[str, Mapping[str, float]],
    domain_intervals: Mapping[str, Mapping[str, tuple[float, float]]],
    domains: list[str],
    scale: float,
) -> dict[str, dict[int, tuple[float, float]]]:
    """Domain -> row index -> (low, high) in drawn units, for the per-domain dots that have an interval."""
    unknown = sorted({d for cells in domain_intervals.values() for d in cells} - set(domains))
    if unknown:
        raise ValueError(f"domain_intervals name domains that are not in the table: {unknown}.")
    ends = {}
    for domain in domains:
        values = [per_domain.get(m, {}).get(domain, math.nan) * scale for m in methods]
        given = {m: cells[domain] for m, cells in domain_intervals.items() if domain in cells}
        ends[domain] = _interval_ends(methods, values, given, scale, "domain_intervals", domain)
    return ends


def method_accuracy_figure(
    table: Mapping[str, float | Mapping[str, float]],
    *,
    title: str | None = None,
    unit: str = "auto",
    highlight_best: bool = True,
    exclude_from_best: Collection[str] = (),
    intervals: Mapping[str, tuple[float, float]] | None = None,
    domain_intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    interval_label: str | None = None,
) -> Figure:
    """Build a horizontal bar chart of mean accuracy per merge method.

    Args:
        table: ``method -> mean accuracy``, or ``method -> {domain: accuracy}`` (the bar is the mean over
            domains, or the entry ``"mean"`` when present, and each domain is drawn as a dot). Methods keep
            the table's order, top to bottom. Non-finite accuracies are shown as "n/a".
        title: Figure title (default "Mean accuracy per merge method").
        unit: ``"fraction"`` (values in [0, 1], drawn as percentages), ``"percent"`` (drawn as given) or
            ``"auto"`` (fractions when every value is in [0, 1], else percentages).
        highlight_best: Colour the best bar differently and mark it "best".
        exclude_from_best: Methods that are references rather than contenders (e.g. the per-domain expert
            upper bound) and cannot be "best".
        intervals: ``method -> (low, high)`` of each mean (in the table's unit), drawn as error bars, e.g. a
            95 % confidence interval. The interval must contain the mean.
        domain_intervals: ``method -> {domain: (low, high)}``: error bars on the per-domain dots (each cell's
            interval, in the table's unit; it must contain the cell's value).
        interval_label: What the error bars are (``"95 % bootstrap interval"``, ``"± std over 3 seeds"``),
            shown in the legend; default ``"interval"`` when there are error bars.

    Returns:
        The figure (Agg canvas, not registered with pyplot).

    Raises:
        ValueError: An empty table, a value that is neither a number nor a mapping of numbers, an unknown
            unit, an interval that does not contain its value, or an interval of a method or domain that is
            not in the table.
    """
    if unit not in ("auto", "fraction", "percent"):
        raise ValueError(f"unit must be 'auto', 'fraction' or 'percent', got {unit!r}.")
    methods, means, per_domain = _accuracy_rows(table)
    every = [v for v in means if math.isfinite(v)]
    every += [a for d in per_domain.values() for a in d.values() if math.isfinite(a)]
    if unit == "auto":
        unit = "fraction" if every and all(0.0 <= v <= 1.0 for v in every) else "percent"
    scale = 100.0 if unit == "fraction" else 1.0
    means = [v * scale for v in means]
    domains = sorted({d for values in per_domain.values() for d in values})
    dot_ends = _domain_ends(methods, per_domain, domain_intervals or {}, domains, scale)

    candidates = [i for i, m in enumerate(methods) if m not in exclude_from_best and math.isfinite(means[i])]
    best = max(candidates, key=lambda i: means[i]) if (highlight_best and candidates) else None

    longest = max(len(m) for m in methods)
    figure = new_figure(max(7.5, 6.0 + 0.07 * longest), max(2.8, 0.5 * len(methods) + 1.8))
    ax = figure.add_subplot()
    positions = list(range(len(methods)))
    heights = [v if math.isfinite(v) else 0.0 for v in means]
    colours = ["tab:orange" if i == best else "tab:blue" for i in positions]
    ax.barh(positions, heights, color=colours, height=0.62, zorder=2)
    ends = _interval_ends(methods, means, intervals or {}, scale)
    if ends:
        rows = sorted(ends)
        below = [means[i] - ends[i][0] for i in rows]
        above = [ends[i][1] - means[i] for i in rows]
        ax.errorbar([means[i] for i in rows], rows, xerr=[below, above], fmt="none", ecolor="black",
                    elinewidth=1.1, capsize=3.5, zorder=5)  # fmt: skip

    finite_values = [v for v in means if math.isfinite(v)] + [high for _, high in ends.values()]
    finite_values += [high for cells in dot_ends.values() for _, high in cells.values()]
    finite_values += [a * scale for d in per_domain.values() for a in d.values() if math.isfinite(a)]
    upper = max(finite_values, default=1.0)
    limit = 100.0 if upper <= 100.0 else upper * 1.08
    ax.set_xlim(0.0, limit * 1.12)
    for i, value in enumerate(means):
        text = "n/a" if not math.isfinite(value) else f"{value:.2f}" + ("  (best)" if i == best else "")
        right = ends[i][1] if i in ends else value
        ax.text(
            (right if math.isfinite(right) else 0.0) + limit * 0.01,
            i,
            text,
            va="center",
            ha="left",
            fontsize=9,
            fontweight="bold" if i == best else "normal",
            zorder=4,
        )
    if domains:
        markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
        dot_colours = task_colours(len(domains))
        offsets = [0.22 * ((index + 0.5) / len(domains) - 0.5) * 2 for index in range(len(domains))]
        for index, domain in enumerate(domains):
            xs, ys = [], []
            for i, method in enumerate(methods):
                accuracy = per_domain.get(method, {}).get(domain)
                if accuracy is not None and math.isfinite(accuracy):
                    xs.append(accuracy * scale)
                    ys.append(i + offsets[index])
            ax.scatter(
                xs,
                ys,
                marker=markers[index % len(markers)],
                s=22,
                color=dot_colours[index],
                edgecolors="black",
                linewidths=0.4,
                zorder=3,
                label=domain,
            )
            rows = sorted(dot_ends[domain])
            if rows:
                centres = [per_domain[methods[i]][domain] * scale for i in rows]
                below = [c - dot_ends[domain][i][0] for c, i in zip(centres, rows, strict=True)]
                above = [dot_ends[domain][i][1] - c for c, i in zip(centres, rows, strict=True)]
                ax.errorbar(centres, [i + offsets[index] for i in rows], xerr=[below, above], fmt="none",
                            ecolor="dimgray", elinewidth=0.8, capsize=1.5, zorder=3,
                            label=f"_{domain} interval")  # fmt: skip
    if ends or any(dot_ends.values()):
        from matplotlib.lines import Line2D

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="black", marker="|", markersize=8, linewidth=1.1))
        labels.append(interval_label or "interval")
        heading = "domain" if domains else None
        ax.legend(handles, labels, title=heading, fontsize=8, title_fontsize=9, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    elif domains:
        ax.legend(title="domain", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_yticks(positions, labels=methods)
    if best is not None:
        ax.get_yticklabels()[best].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3, zorder=0)
    ax.set_title(title or "Mean accuracy per merge method", fontsize=11)
    return figure


def plot_method_accuracy(
    table: Mapping[str, float | Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    unit: str = "auto",
    highlight_best: bool = True,
    exclude_from_best: Collection[str] = (),
    intervals: Mapping[str, tuple[float, float]] | None = None,
    domain_intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    interval_label: str | None = None,
    dpi: int = 150,
) -> Path:
    """Write the bar chart of mean accuracy per merge method (see :func:`method_accuracy_figure`) to a PNG.

    Args:
        table: ``method -> mean accuracy`` or ``method -> {domain: accuracy}``.
        path: Destination PNG; parent folders are created.
        title: Figure title.
        unit: ``"fraction"``, ``"percent"`` or ``"auto"`` (see :func:`method_accuracy_figure`).
        highlight_best: Colour the best bar differently.
        exclude_from_best: Reference rows that cannot be "best".
        intervals: ``method -> (low, high)`` error bars on the means (see :func:`method_accuracy_figure`).
        domain_intervals: ``method -> {domain: (low, high)}`` error bars on the per-domain dots.
        interval_label: What the error bars are, for the legend.
        dpi: Resolution.

    Returns:
        The path written.
    """
    figure = method_accuracy_figure(
        table,
        title=title,
        unit=unit,
        highlight_best=highlight_best,
        exclude_from_best=exclude_from_best,
        intervals=intervals,
        domain_intervals=domain_intervals,
        interval_label=interval_label,
    )
    return save_png(figure, path, dpi=dpi)
