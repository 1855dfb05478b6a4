"""The per-layer singular spectra of task vectors: effective rank per layer and task, and decay curves."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_score.analysis import SingularSpectra
from lightning_score.plots.common import new_figure, save_png, short_key, task_colours

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_singular_spectra", "singular_spectra_figure"]


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
    colours = task_colours(len(spectra.names))
    count = len(keys)
    width = min(max(9.0, 0.21 * count + 3.0), 30.0)
    panels = max(len(chosen), 1)
    height = 4.2 + (3.2 if chosen else 0.0)
    figure = new_figure(max(width, 3.2 * panels), height)
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
