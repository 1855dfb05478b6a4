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
- :func:`plot_method_accuracy`: mean accuracy per merge method as bars, with per-domain values as dots,
  optional error bars (e.g. 95 % intervals) and the best method highlighted.

One module per figure (``alignment``, ``spectra``, ``accuracy``) and what they share (``common``).
"""

from __future__ import annotations

from lightning_score.plots.accuracy import method_accuracy_figure, plot_method_accuracy
from lightning_score.plots.alignment import plot_subspace_alignment, subspace_alignment_figure
from lightning_score.plots.common import PLOT_EXTRA_HINT, save_png, short_key
from lightning_score.plots.spectra import plot_singular_spectra, singular_spectra_figure

__all__ = [
    "PLOT_EXTRA_HINT",
    "method_accuracy_figure",
    "plot_method_accuracy",
    "plot_singular_spectra",
    "plot_subspace_alignment",
    "save_png",
    "short_key",
    "singular_spectra_figure",
    "subspace_alignment_figure",
]
