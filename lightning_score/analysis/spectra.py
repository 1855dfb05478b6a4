"""Step 3 of the analysis, beside SAR: per-key, per-task singular spectra and effective ranks."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_score.analysis.alignment import _matrix_rows
from lightning_score.analysis.keys import MatrixPredicate, _names, _prepare, _stream
from lightning_score.analysis.svd import _scaled_svd, effective_rank
from lightning_score.merging.keys import is_matrix_key

__all__ = ["SingularSpectra", "singular_spectra"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SingularSpectra:
    """Per-key, per-task singular-spectrum summaries of a set of task vectors.

    Attributes:
        names: The task names (a TaskVector's ``name``, else ``"task i"``).
        energy: The energy threshold of the effective ranks.
        top: How many leading singular values were kept per key (None: all r).
        shapes: ``key -> (m, n)``, keys in :func:`depth_key` order.
        effective_rank: ``key -> [T]`` int64 effective ranks k_t at ``energy`` (0 for a zero matrix).
        singular_values: ``key -> [T, min(top, r)]`` float64 leading singular values, descending.
        frobenius_norm: ``key -> [T]`` float64 ‖Δ_t‖_F (the norm over all r singular values, so the energy
            fraction held by the stored leading values is ``cumsum(σ²) / ‖Δ‖_F²``).
    """

    names: list[str]
    energy: float
    top: int | None
    shapes: dict[str, tuple[int, int]]
    effective_rank: dict[str, Tensor]
    singular_values: dict[str, Tensor]
    frobenius_norm: dict[str, Tensor]

    @property
    def keys(self) -> list[str]:
        """The matrix keys, in order."""
        return list(self.shapes)

    def rank_fraction(self, key: str) -> Tensor:
        """``[T]`` effective rank divided by r = min(m, n) for one key: comparable across layer sizes.

        Args:
            key: A key of :attr:`keys`.

        Returns:
            float64 fractions in [0, 1].
        """
        return self.effective_rank[key].to(torch.float64) / min(self.shapes[key])

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """A JSON-serialisable record (plain lists and numbers); :meth:`from_dict` reads it back.

        Args:
            top: Keep only this many leading singular values per key and task (a full ViT-L spectrum is
                about 600 000 numbers); default: all that are stored. Ranks and norms are always exact.

        Returns:
            The record.
        """
        if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1):
            raise ValueError(f"top must be a positive integer (or None for every stored value), got {top!r}.")
        kept = self.top if top is None else top if self.top is None else min(top, self.top)
        values = self.singular_values if top is None else {k: v[:, :top] for k, v in self.singular_values.items()}
        return {
            "kind": "singular_spectra",
            "energy": float(self.energy),
            "top": kept,
            "names": list(self.names),
            "keys": self.keys,
            "shapes": {key: list(shape) for key, shape in self.shapes.items()},
            "effective_rank": {k: [int(v) for v in t.tolist()] for k, t in self.effective_rank.items()},
            "singular_values": {k: _matrix_rows(t) for k, t in values.items()},
            "frobenius_norm": {k: [float(v) for v in t.tolist()] for k, t in self.frobenius_norm.items()},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SingularSpectra:
        """Rebuild from :meth:`to_dict` output.

        Args:
            record: The dictionary.

        Returns:
            The spectra, tensors on CPU.
        """
        return cls(
            names=list(record["names"]),
            energy=float(record["energy"]),
            top=None if record.get("top") is None else int(record["top"]),
            shapes={k: (int(v[0]), int(v[1])) for k, v in record["shapes"].items()},
            effective_rank={k: torch.tensor(v, dtype=torch.int64) for k, v in record["effective_rank"].items()},
            singular_values={
                k: torch.tensor(v, dtype=torch.float64).reshape(len(record["names"]), -1)
                for k, v in record["singular_values"].items()
            },
            frobenius_norm={k: torch.tensor(v, dtype=torch.float64) for k, v in record["frobenius_norm"].items()},
        )

    def to_table(self) -> str:
        """A plain-text table: one row per key with its shape and each task's effective rank k (k / r).

        Returns:
            The table.
        """
        key_width = max(len("key"), *(len(k) for k in self.keys))
        cells = {
            key: [
                f"{int(k)} ({100 * f:.0f}%)"
                for k, f in zip(self.effective_rank[key], self.rank_fraction(key), strict=True)
            ]
            for key in self.keys
        }
        width = max(len(n) for n in self.names)
        width = max([width, *(len(c) for row in cells.values() for c in row)])
        lines = [
            f"Effective rank at energy {self.energy:g} per matrix key: k (k / min(m, n))",
            f"{'key':<{key_width}}  {'shape':>11}  " + "  ".join(f"{n:>{width}}" for n in self.names),
        ]
        for key in self.keys:
            shape = "x".join(str(s) for s in self.shapes[key])
            lines.append(f"{key:<{key_width}}  {shape:>11}  " + "  ".join(f"{c:>{width}}" for c in cells[key]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def singular_spectra(
    task_vectors: Sequence[Mapping[str, Tensor]],
    energy: float = 0.97,
    top: int | None = None,
    *,
    is_matrix: MatrixPredicate = is_matrix_key,
    keys: Collection[str] | None = None,
    prefix: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> SingularSpectra:
    """Per-key, per-task singular-spectrum summaries: effective rank at ``energy`` and leading singular values.

    Args:
        task_vectors: The experts' task vectors (as for :func:`subspace_alignment`).
        energy: The effective-rank threshold, in (0, 1].
        top: How many leading singular values to keep per key and task (default None: all r = min(m, n),
            a few MB for a ViT-L; the rank and norm are exact either way).
        is_matrix: Which keys are matrices (default :func:`~lightning_score.merging.is_matrix_key`).
        keys: Only these keys (each must exist and be a matrix key).
        prefix: Only keys starting with this prefix (or any of these prefixes).
        device: Where to compute (default CPU).
        dtype: Compute dtype, ``torch.float64`` (default) or ``torch.float32``.
        progress: Show a progress bar over the keys.

    Returns:
        A :class:`SingularSpectra` (tensors on CPU; singular values and norms in float64, in the task
        vectors' own scale).

    Raises:
        ValueError: As :func:`subspace_alignment`, and for ``top`` not a positive integer.

    Example:
        >>> import torch
        >>> spectra = singular_spectra([{"w": torch.diag(torch.tensor([4.0, 2.0, 1.0]))}], top=2)
        >>> spectra.effective_rank["w"].tolist(), spectra.singular_values["w"].tolist()
        ([3], [[4.0, 2.0]])
    """
    if top is not None and (isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1):
        raise ValueError(f"top must be a positive integer (or None for every singular value), got {top!r}.")
    tvs, selected, target = _prepare("singular_spectra", task_vectors, energy, is_matrix, keys, prefix, device, dtype)
    started = time.perf_counter()
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    for key, deltas in _stream(tvs, selected, target, dtype, progress, "singular spectra"):
        _, S, scales, _ = _scaled_svd(deltas)
        shapes[key] = (int(deltas.shape[1]), int(deltas.shape[2]))
        ranks[key] = effective_rank(S, energy).to("cpu")
        S64 = S.to("cpu", torch.float64) * scales.to("cpu", torch.float64).unsqueeze(-1)
        values[key] = (S64 if top is None else S64[:, :top]).contiguous()
        norms[key] = torch.linalg.vector_norm(S.to("cpu", torch.float64), dim=-1) * scales.to("cpu", torch.float64)
        del deltas, S
    log.info(
        "Singular spectra of %d task vectors over %d matrix keys on %s in %.2f s.",
        len(tvs),
        len(selected),
        target,
        time.perf_counter() - started,
    )
    return SingularSpectra(
        names=_names(tvs),
        energy=float(energy),
        top=None if top is None else int(top),
        shapes=shapes,
        effective_rank=ranks,
        singular_values=values,
        frobenius_norm=norms,
    )
