"""What every plot shares: a figure on the Agg canvas (never pyplot), atomic PNG writing, colours, key labels."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_score.utilities.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOT_EXTRA_HINT", "new_figure", "save_png", "short_key", "task_colours"]

PLOT_EXTRA_HINT = "install the plot extra: pip install 'lightning-score[plot]'"


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with constrained layout (nothing clipped), never registered with pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"lightning-score plots need matplotlib: {PLOT_EXTRA_HINT}") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def task_colours(count: int) -> list[Any]:
    """``count`` distinguishable colours: tab10 up to ten, else evenly spaced on viridis."""
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
