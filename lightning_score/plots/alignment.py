"""The Subspace Alignment Ratio heat-map: row i = basis task, column j = projected task."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_score.analysis import SubspaceAlignment
from lightning_score.plots.common import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_subspace_alignment", "subspace_alignment_figure"]


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
    figure = new_figure(side + 1.6, side + 0.6)
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
