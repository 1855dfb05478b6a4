"""``lightning-score analyze``: the Subspace Alignment Ratio and singular spectra of task vectors (table, PNG, JSON)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from lightning_score.analysis import singular_spectra, subspace_alignment
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.files import atomic_write_text, ensure_writable

__all__ = ["analyze", "default_output_dir"]

log = logging.getLogger(__name__)


def default_output_dir(task_vectors: list[str]) -> Path:
    """``analysis/`` in the task vectors' folder (their common folder when they lie in several).

    Example:
        >>> str(default_output_dir(["runs/tvs/rot0.safetensors", "runs/tvs/rot15.safetensors"]))
        'runs/tvs/analysis'
        >>> str(default_output_dir(["runs/a/rot0.safetensors", "runs/b/rot15.safetensors"]))
        'runs/analysis'
    """
    folders = [str(Path(path).parent) for path in task_vectors] or ["."]
    return Path(os.path.commonpath(folders)) / "analysis"


def analyze(
    task_vectors: list[str],
    output_dir: str | None = None,
    energy: float = 0.97,
    prefix: str | None = None,
    device: str = "cpu",
) -> None:
    """Subspace Alignment Ratio and singular spectra of a set of task vectors: printed, and saved as PNG and JSON.

    Args:
        task_vectors: The task-vector files (``.safetensors``).
        output_dir: Where to write ``sar.png``, ``spectra.png``, ``sar.json`` and ``spectra.json``; default
            ``analysis/`` in the task vectors' folder (e.g. ``runs/digits/task_vectors/analysis``).
        energy: Energy threshold of the effective rank (0.97 in the SCORE paper).
        prefix: Only keys starting with this (e.g. ``transformer.resblocks.11.``).
        device: Where to compute the SVDs (``cpu`` or ``cuda``).
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir(task_vectors)
    ensure_writable(out, what="--output_dir")  # before the SVDs, not after them
    tvs = [TaskVector.load(path) for path in task_vectors]
    sar = subspace_alignment(tvs, energy=energy, prefix=prefix, device=device, progress=True)
    spectra = singular_spectra(tvs, energy=energy, prefix=prefix, device=device, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sar.json", json.dumps(sar.to_dict(), indent=2))
    atomic_write_text(out / "spectra.json", json.dumps(spectra.to_dict(top=16), indent=2))
    written = [out / "sar.json", out / "spectra.json"]
    try:
        from lightning_score.plots import plot_singular_spectra, plot_subspace_alignment

        written += [plot_subspace_alignment(sar, out / "sar.png"), plot_singular_spectra(spectra, out / "spectra.png")]
    except ImportError as error:
        log.warning("%s (the tables and JSON files are written; the PNGs need the plot extra).", error)
    sys.stdout.write(sar.to_table() + "\n\n" + spectra.to_table() + "\n\n")
    sys.stdout.write("Wrote " + ", ".join(str(p) for p in written) + "\n")
