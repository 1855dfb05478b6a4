"""Plots of the subspace-conflict analysis and of merge results, written to PNG files.

Needs matplotlib, the ``plot`` extra (``pip install 'lightning-score[plot]'``); it is imported only when a
function here is called. Figures are built as plain :class:`matplotlib.figure.Figure` objects on the Agg
canvas, never through ``pyplot``, so nothing opens a window, no global backend is switched and nothing is
left in pyplot's figure registry.

Each plot comes as a pair: ``*_figure(...)`` builds the figure (to inspect, restyle or embed), and
``plot_*(..., path)`` builds it and writes a PNG atomically (a temporary file in the same folder, then a
rename), returning the path.

- :func:`plot_subspace_alignment`: the T×T SAR heat-map (row i = basis task, column j = projected task).
- :func:`plot_singular_spectra`: effective rank per layer and task, plus singular-value decay curves for
  a few layers.
- :func:`plot_method_accuracy`: mean accuracy per merge method as bars, with per-domain values as dots and
  the best method highlighted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_score.analysis import SingularSpectra, SubspaceAlignment
from lightning_score.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "method_accuracy_figure",
    "plot_method_accuracy",
    "plot_singular_spectra",
    "plot_subspace_alignment",
    "save_png",
    "short_key",
    "singular_spectra_figure",
    "subspace_alignment_figure",
]

PLOT_EXTRA_HINT = "install the plot extra: pip install 'lightning-score[plot]'"


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with constrained layout (nothing clipped), never registered with pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"lightning-score plots need matplotlib: {PLOT_EXTRA_HINT}") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _task_colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    return [colormaps["viridis"](i / max(count - 1, 1)) for i in range(count)]


def save_png(figure: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Write a figure to a PNG file atomically: a temporary file in the same folder, then a rename.

    Args:
        figure: The figure.
        path: Destination; parent folders are created. Written as PNG whatever its suffix.
        dpi: Resolution.

    Returns:
        The path written.
    """
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))


def short_key(key: str) -> str:
    """A short label for a state-dict key: ``transformer.resblocks.3.mlp.c_fc.weight`` -> ``b3.mlp.c_fc``.

    Example:
        >>> short_key("visual.transformer.resblocks.11.attn.in_proj_weight")
        'b11.attn.in_proj'
        >>> short_key("positional_embedding"), short_key("proj")
        ('positional_embedding', 'proj')
    """
    label = re.sub(r"^(?:.*\.)?resblocks\.(\d+)\.", r"b\1.", key)
    return re.sub(r"[._]weight$", "", label)


# --- SAR heat-map --------------------------------------------------------------------------------


def _as_alignment(sar: SubspaceAlignment | Mapping[str, Any]) -> SubspaceAlignment:
    if isinstance(sar, SubspaceAlignment):
        return sar
    if isinstance(sar, Mapping):
        return SubspaceAlignment.from_dict(sar)
    raise TypeError(f"Expected a SubspaceAlignment (or its to_dict() record), got {type(sar).__name__}.")


def subspace_alignment_figure(
    sar: SubspaceAlignment | Mapping[str, Any],
    *,
    title: str | None = None,
    cmap: str = "viridis",
    digits: int = 2,
) -> Figure:
    """Build the SAR heat-map: task names on both axes, every value written in its cell, a colour bar.

    Args:
        sar: The result of :func:`~lightning_score.analysis.subspace_alignment` (or its ``to_dict()``).
        title: The headline (default "Subspace Alignment Ratio"); the orientation, the number of keys,
            the energy threshold and the mean off-diagonal value are always written below it.
        cmap: A matplotlib colour map name; the scale is fixed to [0, 1].
        digits: Decimal places of the cell annotations.

    Returns:
        The figure (Agg canvas, not registered with pyplot).
    """
    sar = _as_alignment(sar)
    matrix = sar.matrix.double().cpu().numpy()
    T = len(sar.names)
    longest = max(len(name) for name in sar.names)
    side = max(4.8, 0.85 * T + 0.09 * longest + 2.0)
    figure = _new_figure(side + 1.6, side + 0.6)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap=cmap)
    colormap = image.get_cmap()
    font = 11 if T <= 6 else 9 if T <= 10 else 7
    for i in range(T):
        for j in range(T):
            value = float(matrix[i, j])
            red, green, blue, _ = colormap(value)
            luminance = 0.299 * red + 0.587 * green + 0.114 * blue
            ax.text(
                j,
                i,
                f"{value:.{digits}f}",
                ha="center",
                va="center",
                fontsize=font,
                color="black" if luminance > 0.5 else "white",
                fontweight="bold" if i == j else "normal",
            )
    ax.set_xticks(range(T), labels=sar.names, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(T), labels=sar.names)
    ax.set_xlabel(r"projected task $j$  ($\Delta_j$)")
    ax.set_ylabel(r"basis task $i$  (subspace $U_{i,:k_i}$)")
    ax.tick_params(length=0)
    ax.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    colour_bar = figure.colorbar(image, ax=ax, shrink=0.85, pad=0.03)
    colour_bar.set_label(r"SAR$(\Delta_j \mid \Delta_i)$  (1 = $\Delta_j$ lies in $i$'s subspace)")
    details = f"row $i$ = basis task, column $j$ = projected task\nmean over {len(sar.per_key)} matrix key(s)"
    details += f", energy {sar.energy:g}"
    if T >= 2:
        details += f", mean off-diagonal {sar.mean_off_diagonal():.{digits + 1}f}"
    ax.set_title(details, fontsize=9.5)
    figure.suptitle(title or "Subspace Alignment Ratio", fontsize=12, fontweight="bold")
    return figure


def plot_subspace_alignment(
    sar: SubspaceAlignment | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    cmap: str = "viridis",
    digits: int = 2,
    dpi: int = 150,
) -> Path:
    """Write the SAR heat-map (see :func:`subspace_alignment_figure`) to a PNG file.

    Args:
        sar: The result of :func:`~lightning_score.analysis.subspace_alignment` (or its ``to_dict()``).
        path: Destination PNG; parent folders are created.
        title: The headline.
        cmap: A matplotlib colour map name.
        digits: Decimal places of the cell annotations.
        dpi: Resolution.

    Returns:
        The path written.
    """
    return save_png(subspace_alignment_figure(sar, title=title, cmap=cmap, digits=digits), path, dpi=dpi)


# --- singular spectra -----------------------------------------------------------------------------


def _as_spectra(spectra: SingularSpectra | Mapping[str, Any]) -> SingularSpectra:
    if isinstance(spectra, SingularSpectra):
        return spectra
    if isinstance(spectra, Mapping):
        return SingularSpectra.from_dict(spectra)
    raise TypeError(f"Expected a SingularSpectra (or its to_dict() record), got {type(spectra).__name__}.")


def _default_layers(keys: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` keys spread over the depth, taken from the transformer blocks when there are enough."""
    if count <= 0 or not keys:
        return []
    blocks = [k for k in keys if _block_of(k) is not None]
    if len(blocks) >= count:
        keys = blocks
    if len(keys) <= count:
        return list(keys)
    picks = sorted({round(i * (len(keys) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
    return [keys[i] for i in picks]


def _block_of(key: str) -> str | None:
    match = re.search(r"resblocks\.(\d+)\.", key)
    return match.group(1) if match else None


def singular_spectra_figure(
    spectra: SingularSpectra | Mapping[str, Any],
    *,
    layers: Sequence[str] | None = None,
    max_layers: int = 4,
    title: str | None = None,
) -> Figure:
    """Build the per-layer spectrum plot.

    Top panel: the effective rank k (at the spectra's energy threshold) divided by r = min(m, n), per matrix
    key (x axis, in depth order) and task (one line each), so that layers of different sizes compare.
    Bottom row: the normalised singular values σ_l / σ_1 on a log scale for a few layers (by default spread
    over the transformer blocks), one line per task, with a dot at each task's effective rank when it is
    among the stored values (compute the spectra with ``top=None`` to see every value).

    Args:
        spectra: The result of :func:`~lightning_score.analysis.singular_spectra` (or its ``to_dict()``).
        layers: Keys to draw decay curves for (default: up to ``max_layers`` spread over the depth).
        max_layers: How many decay panels by default (0: none).
        title: Figure title (default: "Singular spectra of the task vectors").

    Returns:
        The figure (Agg canvas, not registered with pyplot).

    Raises:
        ValueError: A requested layer is not among the spectra's keys.
    """
    from matplotlib.ticker import MaxNLocator

    spectra = _as_spectra(spectra)
    keys = spectra.keys
    if layers is None:
        chosen = _default_layers(keys, max_layers)
    else:
        chosen = list(layers)
        unknown = [k for k in chosen if k not in spectra.shapes]
        if unknown:
            raise ValueError(f"Layer '{unknown[0]}' is not among the spectra's keys (e.g. {keys[:3]}).")
    colours = _task_colours(len(spectra.names))
    count = len(keys)
    width = min(max(9.0, 0.21 * count + 3.0), 30.0)
    panels = max(len(chosen), 1)
    height = 4.2 + (3.2 if chosen else 0.0)
    figure = _new_figure(max(width, 3.2 * panels), height)
    grid = figure.add_gridspec(2 if chosen else 1, panels, height_ratios=[1.25, 1.0] if chosen else None)
    top = figure.add_subplot(grid[0, :])

    positions = list(range(count))
    fractions = [spectra.rank_fraction(key) for key in keys]
    for t, name in enumerate(spectra.names):
        top.plot(
            positions,
            [float(f[t]) for f in fractions],
            marker="o",
            markersize=3.5 if count > 20 else 5,
            linewidth=1.3,
            color=colours[t],
            label=name,
        )
    label_size = 8 if count <= 30 else 7 if count <= 60 else 5.5
    top.set_xticks(positions, labels=[short_key(k) for k in keys], rotation=90, fontsize=label_size)
    top.set_xlim(-0.7, count - 0.3)
    top.set_ylim(0.0, 1.05)
    top.set_ylabel("effective rank k / min(m, n)")
    top.set_title(f"Effective rank holding {spectra.energy:.0%} of each task matrix's energy, per layer", fontsize=11)
    top.grid(axis="y", alpha=0.3)
    blocks = [_block_of(k) for k in keys]
    for index in range(1, count):
        if blocks[index] != blocks[index - 1]:
            top.axvline(index - 0.5, color="0.85", linewidth=0.8, zorder=0)
    top.legend(title="task", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1.005, 1.0))

    shared = None
    for column, key in enumerate(chosen):
        ax = figure.add_subplot(grid[1, column], sharey=shared)
        shared = shared or ax
        values = spectra.singular_values[key]
        drawn = 0
        for t in range(len(spectra.names)):
            row = values[t]
            if float(row[0]) <= 0:
                continue  # a zero matrix has no spectrum to normalise
            drawn += 1
            curve = (row / row[0]).tolist()
            ranks = list(range(1, len(curve) + 1))
            ax.plot(ranks, curve, color=colours[t], linewidth=1.3)
            k = int(spectra.effective_rank[key][t])
            if 1 <= k <= len(curve):
                ax.plot([k], [curve[k - 1]], marker="o", markersize=5, color=colours[t], markeredgecolor="black")
        if not drawn:
            ax.text(0.5, 0.5, "zero in every task", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        m, n = spectra.shapes[key]
        stored = values.shape[1]
        shown = "" if stored >= min(m, n) else f", leading {stored}"
        ax.set_title(f"{short_key(key)}  ({m}×{n}{shown})", fontsize=9)
        ax.set_xlabel("index l", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="major")
        if column == 0:
            ax.set_ylabel(r"$\sigma_l / \sigma_1$  (dot: rank $k$)", fontsize=9)
    figure.suptitle(title or "Singular spectra of the task vectors", fontsize=12)
    return figure


def plot_singular_spectra(
    spectra: SingularSpectra | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    max_layers: int = 4,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """Write the per-layer spectrum plot (see :func:`singular_spectra_figure`) to a PNG file.

    Args:
        spectra: The result of :func:`~lightning_score.analysis.singular_spectra` (or its ``to_dict()``).
        path: Destination PNG; parent folders are created.
        layers: Keys to draw decay curves for (default: up to ``max_layers`` spread over the depth).
        max_layers: How many decay panels by default (0: none).
        title: Figure title.
        dpi: Resolution.

    Returns:
        The path written.
    """
    figure = singular_spectra_figure(spectra, layers=layers, max_layers=max_layers, title=title)
    return save_png(figure, path, dpi=dpi)


# --- merge-method accuracy ------------------------------------------------------------------------


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


def method_accuracy_figure(
    table: Mapping[str, float | Mapping[str, float]],
    *,
    title: str | None = None,
    unit: str = "auto",
    highlight_best: bool = True,
    exclude_from_best: Collection[str] = (),
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

    Returns:
        The figure (Agg canvas, not registered with pyplot).

    Raises:
        ValueError: An empty table, a value that is neither a number nor a mapping of numbers, or an
            unknown unit.
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

    candidates = [i for i, m in enumerate(methods) if m not in exclude_from_best and math.isfinite(means[i])]
    best = max(candidates, key=lambda i: means[i]) if (highlight_best and candidates) else None

    longest = max(len(m) for m in methods)
    figure = _new_figure(max(7.5, 6.0 + 0.07 * longest), max(2.8, 0.5 * len(methods) + 1.8))
    ax = figure.add_subplot()
    positions = list(range(len(methods)))
    heights = [v if math.isfinite(v) else 0.0 for v in means]
    colours = ["tab:orange" if i == best else "tab:blue" for i in positions]
    ax.barh(positions, heights, color=colours, height=0.62, zorder=2)

    finite_values = [v for v in means if math.isfinite(v)]
    finite_values += [a * scale for d in per_domain.values() for a in d.values() if math.isfinite(a)]
    upper = max(finite_values, default=1.0)
    limit = 100.0 if upper <= 100.0 else upper * 1.08
    ax.set_xlim(0.0, limit * 1.12)
    for i, value in enumerate(means):
        text = "n/a" if not math.isfinite(value) else f"{value:.2f}" + ("  (best)" if i == best else "")
        ax.text(
            (value if math.isfinite(value) else 0.0) + limit * 0.01,
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
        dot_colours = _task_colours(len(domains))
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
        dpi: Resolution.

    Returns:
        The path written.
    """
    figure = method_accuracy_figure(
        table, title=title, unit=unit, highlight_best=highlight_best, exclude_from_best=exclude_from_best
    )
    return save_png(figure, path, dpi=dpi)
