"""Step 3 of the analysis: the T×T Subspace Alignment Ratio of a set of task vectors, averaged over matrix keys."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_score.analysis.keys import MatrixPredicate, _names, _prepare, _stream
from lightning_score.analysis.svd import _alignment_from_svd, _scaled_svd, effective_rank
from lightning_score.merging.keys import is_matrix_key

__all__ = ["ORIENTATION", "SubspaceAlignment", "subspace_alignment"]

log = logging.getLogger(__name__)

ORIENTATION = "matrix[i][j] = SAR(Δ_j | Δ_i): row i is the basis task i, column j the projected task j"


def _matrix_rows(matrix: Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix.tolist()]


@dataclass(frozen=True)
class SubspaceAlignment:
    """The T×T Subspace Alignment Ratio of a set of task vectors, overall and per key.

    Orientation: ``matrix[i, j] = SAR(Δ_j | Δ_i)``, **row i is the basis task** (whose dominant column
    space is projected onto) and **column j the projected task**. Not symmetric in general.

    Attributes:
        matrix: ``[T, T]`` float64, the mean over the selected keys of the per-key values (for column j,
            over the keys where Δ_j ≠ 0; 0 if there are none).
        per_key: ``key -> [T, T]`` float64 per-key SAR (0 where Δ_j = 0), keys in
            :func:`depth_key` order (embeddings, blocks 0, 1, …, 10, head).
        names: The task names (a TaskVector's ``name``, else ``"task i"``).
        energy: The energy threshold used for the effective ranks.
        ranks: ``key -> [T]`` int64 effective ranks k_i of the basis tasks.
        shapes: ``key -> (m, n)``.
    """

    matrix: Tensor
    per_key: dict[str, Tensor]
    names: list[str]
    energy: float
    ranks: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """The matrix keys the mean is taken over, in order."""
        return list(self.per_key)

    def mean_off_diagonal(self) -> float:
        """The mean of the T·(T − 1) off-diagonal entries: one number for "how much do the tasks overlap".

        Returns:
            The mean, or NaN for a single task (there are no pairs).
        """
        T = self.matrix.shape[0]
        if T < 2:
            return math.nan
        mask = ~torch.eye(T, dtype=torch.bool)
        return float(self.matrix[mask].mean())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (plain lists and numbers); :meth:`from_dict` reads it back."""
        return {
            "kind": "subspace_alignment",
            "orientation": ORIENTATION,
            "energy": float(self.energy),
            "names": list(self.names),
            "matrix": _matrix_rows(self.matrix),
            "mean_off_diagonal": None if len(self.names) < 2 else self.mean_off_diagonal(),
            "keys": self.keys,
            "per_key": {key: _matrix_rows(value) for key, value in self.per_key.items()},
            "ranks": {key: [int(v) for v in value.tolist()] for key, value in self.ranks.items()},
            "shapes": {key: list(shape) for key, shape in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SubspaceAlignment:
        """Rebuild from :meth:`to_dict` output (e.g. a JSON file written by the CLI).

        Args:
            record: The dictionary.

        Returns:
            The alignment, tensors in float64 on CPU.
        """
        return cls(
            matrix=torch.tensor(record["matrix"], dtype=torch.float64),
            per_key={k: torch.tensor(v, dtype=torch.float64) for k, v in record["per_key"].items()},
            names=list(record["names"]),
            energy=float(record["energy"]),
            ranks={k: torch.tensor(v, dtype=torch.int64) for k, v in record.get("ranks", {}).items()},
            shapes={k: (int(v[0]), int(v[1])) for k, v in record.get("shapes", {}).items()},
        )

    def to_table(self, digits: int = 3) -> str:
        """A plain-text table for a terminal: rows are basis tasks, columns projected tasks.

        Args:
            digits: Decimal places.

        Returns:
            The table, with a header line stating the orientation, threshold and number of keys.
        """
        corner = "basis \\ projected"
        width = max(digits + 2, *(len(n) for n in self.names))
        first = max(len(corner), *(len(n) for n in self.names))
        lines = [
            f"Subspace Alignment Ratio SAR(Δ_j | Δ_i), mean over {len(self.per_key)} matrix key(s), "
            f"energy {self.energy:g}",
            "(row i = basis task i, column j = projected task j; 1 = j lies inside i's dominant subspace)",
            f"{corner:<{first}}  " + "  ".join(f"{n:>{width}}" for n in self.names),
        ]
        for name, row in zip(self.names, self.matrix.tolist(), strict=True):
            lines.append(f"{name:<{first}}  " + "  ".join(f"{v:>{width}.{digits}f}" for v in row))
        if len(self.names) >= 2:
            lines.append(f"mean off-diagonal: {self.mean_off_diagonal():.{digits}f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def subspace_alignment(
    task_vectors: Sequence[Mapping[str, Tensor]],
    energy: float = 0.97,
    *,
    is_matrix: MatrixPredicate = is_matrix_key,
    keys: Collection[str] | None = None,
    prefix: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> SubspaceAlignment:
    """The T×T Subspace Alignment Ratio of T task vectors (SCORE's definition), averaged over matrix keys.

    ``result.matrix[i, j] = SAR(Δ_j | Δ_i) = ‖U_{i,:k_i} U_{i,:k_i}ᵀ Δ_j‖_F / ‖Δ_j‖_F``: row i is the basis
    task, column j the projected task. Every ordered pair is computed (i = j included) and the matrix is not
    symmetrised. Keys are read one at a time, so lazily loaded task vectors of a large model stream from
    disk; each key costs one batched SVD of its T matrices.

    Args:
        task_vectors: The experts' task vectors (TaskVector objects or plain mappings) with the same keys,
            shapes and dtypes, made from the same pre-trained weights.
        energy: Fraction of each basis task's squared Frobenius norm its rank k_i must hold, in (0, 1].
        is_matrix: Which keys are matrices (default :func:`~lightning_score.merging.is_matrix_key`).
        keys: Only these keys (each must exist and be a matrix key).
        prefix: Only keys starting with this prefix (or any of these prefixes), e.g. ``"visual."`` for the
            image tower of a whole CLIP state dict.
        device: Where to compute (default CPU; e.g. ``"cuda"`` for a ViT-L).
        dtype: Compute dtype, ``torch.float64`` (default) or ``torch.float32`` (faster on GPUs).
        progress: Show a progress bar over the keys.

    Returns:
        A :class:`SubspaceAlignment` (tensors on CPU in float64).

    Raises:
        ValueError: No task vectors, mismatched keys/shapes/dtypes/base fingerprints, non-finite values,
            energy outside (0, 1], an unsupported dtype, or no matrix keys selected.

    Example:
        >>> import torch
        >>> base = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 6.0))  # rank 1, column space e = 1..6
        >>> sar = subspace_alignment([{"w": base}, {"w": -3 * base}, {"w": torch.eye(6, 5)}])
        >>> sar.matrix.shape, round(sar.matrix[0, 1].item(), 4)  # same column space
        (torch.Size([3, 3]), 1.0)
        >>> round(sar.matrix[2, 0].item(), 4), round(sar.matrix[0, 2].item(), 4)  # not symmetric
        (0.7774, 0.3477)
    """
    tvs, selected, target = _prepare("subspace_alignment", task_vectors, energy, is_matrix, keys, prefix, device, dtype)
    T = len(tvs)
    started = time.perf_counter()
    total = torch.zeros(T, T, dtype=torch.float64)
    counts = torch.zeros(T, dtype=torch.float64)
    per_key: dict[str, Tensor] = {}
    ranks: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    zero_keys: list[str] = []
    for key, deltas in _stream(tvs, selected, target, dtype, progress, "subspace alignment"):
        U, S, _, zero = _scaled_svd(deltas)
        key_ranks = effective_rank(S, energy)
        sar = _alignment_from_svd(U, S, key_ranks).to("cpu", torch.float64)
        nonzero = (~zero).to("cpu", torch.float64)
        total += sar * nonzero.unsqueeze(0)
        counts += nonzero
        per_key[key] = sar
        ranks[key] = key_ranks.to("cpu")
        shapes[key] = (int(deltas.shape[1]), int(deltas.shape[2]))
        if bool(zero.any()):
            zero_keys.append(key)
        del deltas, U, S
    matrix = torch.where(counts > 0, total / counts.clamp_min(1.0), torch.zeros_like(total))
    if zero_keys:
        log.warning(
            "%d key(s) are all-zero in some task (e.g. '%s'); SAR of a zero matrix is 0 and those keys are left "
            "out of that task's column mean.",
            len(zero_keys),
            zero_keys[0],
        )
    log.info(
        "Subspace alignment of %d task vectors over %d matrix keys on %s in %.2f s.",
        T,
        len(selected),
        target,
        time.perf_counter() - started,
    )
    return SubspaceAlignment(
        matrix=matrix, per_key=per_key, names=_names(tvs), energy=float(energy), ranks=ranks, shapes=shapes
    )
