"""Subspace-conflict analysis: the Subspace Alignment Ratio (SAR) and singular-spectrum summaries.

Notation of the SCORE paper (Chaves et al., CVPR 2026, arXiv:2603.05768). For T task vectors and one matrix key,
Δ_t ∈ ℝ^{m×n} is task t's update, r = min(m, n), and Δ_t = U_t S_t V_tᵀ its thin SVD with singular
values σ_1 ≥ … ≥ σ_r.

- **Effective rank at an energy threshold.** k_t is the smallest rank whose leading singular values hold
  at least ``energy`` of Δ_t's squared Frobenius norm: Σ_{l ≤ k_t} σ_l² ≥ energy · Σ_l σ_l². (This is the
  definition; the SCORE authors' script takes one rank fewer.) A zero matrix has k_t = 0.
- **Subspace Alignment Ratio.** SAR(Δ_j | Δ_i) = ‖U_{i,:k_i} U_{i,:k_i}ᵀ Δ_j‖_F / ‖Δ_j‖_F ∈ [0, 1]: the
  fraction (in Frobenius norm) of task j's update that lies in the dominant column space of task i's
  update. Computed for every ordered pair, i = j included, it forms a T×T matrix whose **row i is the basis
  task i and column j the projected task j**. High off-diagonal values mean strongly overlapping
  subspaces: the conflicts SCORE resolves.

Two consequences worth knowing when reading the numbers. The matrix is not symmetric in general (a task
with a narrow subspace can lie inside a wide one but not the reverse), and the diagonal is not exactly 1:
SAR(Δ_i | Δ_i) = sqrt(Σ_{l ≤ k_i} σ_l² / Σ_l σ_l²) ∈ [sqrt(energy), 1], equal to 1 only when the leading
k_i directions hold all of Δ_i (a matrix of rank ≤ k_i, or ``energy=1.0``).

**Zero matrices.** When Δ_j = 0 the ratio is 0/0; it is defined as 0 in the per-key values, and the mean
over keys of column j skips those keys (a key that a task did not change says nothing about its
overlap). When Δ_i = 0, k_i = 0 and the basis is empty, so SAR(Δ_j | Δ_i) = 0 for every non-zero Δ_j.
Neither case ever produces NaN.

Everything here is pure torch: task vectors (lazy files included) are read one key at a time, each key's
T matrices get one batched SVD on the compute device, and the results come back on CPU in float64.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_score.merging.engine import _as_task_vectors, _check_compatible, is_matrix_key
from lightning_score.task_vector import TaskVector

__all__ = [
    "SingularSpectra",
    "SubspaceAlignment",
    "depth_key",
    "effective_rank",
    "key_alignment",
    "singular_spectra",
    "subspace_alignment",
]

log = logging.getLogger(__name__)

MatrixPredicate = Callable[[str, tuple[int, ...]], bool]

ORIENTATION = "matrix[i][j] = SAR(Δ_j | Δ_i): row i is the basis task i, column j the projected task j"


# --- the maths, one key at a time ----------------------------------------------------------------


def effective_rank(singular_values: Tensor, energy: float = 0.97) -> Tensor:
    """The smallest rank whose leading singular values hold at least ``energy`` of the squared norm.

    k = min{k : Σ_{l ≤ k} σ_l² ≥ energy · Σ_l σ_l²}, with a rounding allowance of r·eps relative to the
    total (so that ``energy=1.0`` gives the numerical rank instead of depending on the last bit of a
    cumulative sum). A zero matrix (all σ = 0) has rank 0.

    Args:
        singular_values: ``[..., r]`` singular values in descending order (batch dimensions allowed).
        energy: The threshold, in (0, 1].

    Returns:
        ``[...]`` int64 ranks in [0, r], on the input's device.

    Example:
        >>> import torch
        >>> effective_rank(torch.tensor([3.0, 1.0, 0.0]), energy=0.9).item()
        1
        >>> effective_rank(torch.tensor([3.0, 1.0, 0.0]), energy=1.0).item()
        2
    """
    _check_energy(energy)
    r = singular_values.shape[-1]
    squares = singular_values.to(torch.promote_types(singular_values.dtype, torch.float32)) ** 2
    total = squares.sum(dim=-1, keepdim=True)
    cumulative = squares.cumsum(dim=-1)
    allowance = total * (max(r, 1) * torch.finfo(squares.dtype).eps)
    below = (cumulative < energy * total - allowance).sum(dim=-1)
    ranks = torch.clamp(below + 1, max=r)
    return torch.where(total.squeeze(-1) > 0, ranks, torch.zeros_like(ranks))


def _scaled_svd(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched thin SVD of ``[T, m, n]`` after scaling each matrix by its largest magnitude.

    SAR and the effective rank are invariant to each task's scale; the scaling keeps squared norms away from
    underflow and overflow. Returns ``U [T, m, r]``, the scaled ``S [T, r]``, the scales ``[T]`` (1 for a
    zero matrix) and the zero-matrix mask ``[T]``.
    """
    scales = deltas.abs().amax(dim=(-2, -1))
    zero = scales == 0
    scales = torch.where(zero, torch.ones_like(scales), scales)
    U, S, _ = torch.linalg.svd(deltas / scales[:, None, None], full_matrices=False)
    return U, S, scales, zero


def _alignment_from_svd(U: Tensor, S: Tensor, ranks: Tensor) -> Tensor:
    """SAR for all ordered pairs of one key, from the thin SVDs of its T matrices.

    Since Δ_j = U_j S_j V_jᵀ with orthonormal rows in V_jᵀ, and U_{i,:k} has orthonormal columns,
    ‖U_{i,:k} U_{i,:k}ᵀ Δ_j‖_F = ‖U_{i,:k}ᵀ U_j S_j‖_F: an r-wide product instead of an n-wide one.
    """
    T = U.shape[0]
    weighted = U * S.unsqueeze(-2)  # U_j S_j, [T, m, r]
    norms = torch.linalg.vector_norm(S, dim=-1)  # ‖Δ_j‖_F
    projected = torch.zeros(T, T, dtype=U.dtype, device=U.device)
    for i in range(T):
        k = int(ranks[i])
        if k == 0:
            continue
        coefficients = U[i, :, :k].mT @ weighted  # [T, k, r]
        projected[i] = torch.linalg.matrix_norm(coefficients)
    defined = norms > 0
    ratio = projected / torch.where(defined, norms, torch.ones_like(norms))
    ratio = torch.where(defined.unsqueeze(0), ratio, torch.zeros_like(ratio))
    return ratio.clamp_(0.0, 1.0)


def key_alignment(deltas: Tensor, energy: float = 0.97) -> tuple[Tensor, Tensor]:
    """SAR between every ordered pair of T matrices of one key (the SCORE paper's definition).

    Args:
        deltas: ``[T, m, n]``, the T tasks' updates of one matrix key, any floating dtype and device.
            Computed in the input dtype promoted to at least float32 (pass float64 for reference accuracy).
        energy: The energy threshold that sets each basis task's rank k_i, in (0, 1].

    Returns:
        ``(sar, ranks)``: ``sar [T, T]`` with ``sar[i, j] = SAR(Δ_j | Δ_i)`` (row i is the basis task,
        column j the projected task; 0 where Δ_j = 0), and ``ranks [T]`` the effective ranks k_i. Both on
        the input's device.

    Example:
        >>> import torch
        >>> a = torch.zeros(4, 3); a[0, 0] = 1.0
        >>> b = torch.zeros(4, 3); b[0, 1] = 1.0; b[1, 2] = 1.0
        >>> sar, ranks = key_alignment(torch.stack([a, b]))
        >>> [[round(v, 3) for v in row] for row in sar.tolist()], ranks.tolist()
        ([[1.0, 0.707], [1.0, 1.0]], [1, 2])
    """
    _check_energy(energy)
    if deltas.ndim != 3:
        raise ValueError(f"key_alignment takes a [T, m, n] stack of matrices, got shape {tuple(deltas.shape)}.")
    if not deltas.is_floating_point():
        raise ValueError(f"key_alignment takes floating-point matrices, got {deltas.dtype}.")
    deltas = deltas.to(torch.promote_types(deltas.dtype, torch.float32))
    U, S, _, _ = _scaled_svd(deltas)
    ranks = effective_rank(S, energy)
    return _alignment_from_svd(U, S, ranks), ranks


# --- results ---------------------------------------------------------------------------------------


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


# --- validation and streaming ---------------------------------------------------------------------


def _check_energy(energy: float) -> None:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not (0.0 < float(energy) <= 1.0):
        raise ValueError(
            f"energy must be a number in (0, 1] (the fraction of each task matrix's squared Frobenius norm "
            f"that its basis must hold, e.g. 0.97), got {energy!r}."
        )


def _prepare(
    function: str,
    task_vectors: Sequence[Mapping[str, Tensor]],
    energy: float,
    is_matrix: MatrixPredicate,
    keys: Collection[str] | None,
    prefix: str | Sequence[str] | None,
    device: str | torch.device,
    dtype: torch.dtype,
) -> tuple[list[TaskVector], list[str], torch.device]:
    """Validate everything up front and choose the keys; raises ValueError naming what is wrong."""
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise ValueError(
            f"{function} takes a sequence of task vectors (one mapping key -> tensor per expert); got "
            f"{type(task_vectors).__name__}. Wrap a single task vector in a list."
        )
    if len(task_vectors) == 0:
        raise ValueError(
            f"{function} got an empty list of task vectors: pass at least one, e.g. "
            "[TaskVector.load(p) for p in paths]."
        )
    _check_energy(energy)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (SVDs need at least float32), got {dtype}.")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{target}' was requested but CUDA is not available here; pass device='cpu'.")
    tvs = _as_task_vectors(task_vectors)
    _check_compatible(tvs)
    return tvs, _select_keys(tvs[0], is_matrix, keys, prefix), target


def _select_keys(
    reference: TaskVector,
    is_matrix: MatrixPredicate,
    keys: Collection[str] | None,
    prefix: str | Sequence[str] | None,
) -> list[str]:
    """The matrix keys to analyse, in the task vectors' order."""
    all_keys = list(reference)
    candidates = all_keys
    if prefix is not None:
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        candidates = [k for k in candidates if k.startswith(prefixes)]
    if keys is not None:
        if isinstance(keys, str):
            keys = [keys]
        wanted = set(keys)
        unknown = sorted(wanted - set(all_keys))
        if unknown:
            raise ValueError(
                f"{len(unknown)} requested key(s) are not in the task vectors, e.g. {unknown[:3]}; "
                f"the task vectors have keys such as {all_keys[:3]}."
            )
        not_matrices = [k for k in all_keys if k in wanted and not is_matrix(k, reference.tensor_spec(k)[0])]
        if not_matrices:
            shape = tuple(reference.tensor_spec(not_matrices[0])[0])
            raise ValueError(
                f"Requested key '{not_matrices[0]}' (shape {shape}) is not a matrix key: SAR and spectra are "
                "defined for 2-D matrix keys (see is_matrix_key). Leave it out, or pass another is_matrix predicate."
            )
        candidates = [k for k in candidates if k in wanted]
    selected = sorted((k for k in candidates if is_matrix(k, tuple(reference.tensor_spec(k)[0]))), key=depth_key)
    if not selected:
        raise ValueError(
            f"No matrix keys selected (the task vectors have {len(all_keys)} key(s); prefix={prefix!r}, "
            f"keys={None if keys is None else sorted(keys)[:5]!r}). SAR and spectra need 2-D matrix keys such as "
            "'transformer.resblocks.0.attn.in_proj_weight': check the prefix, the key list or the is_matrix predicate."
        )
    return selected


def depth_key(key: str) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    """Sort key that puts state-dict keys in depth order: embeddings, numbered blocks, then the rest.

    Keys with ``embed`` in their name and no block number come first, keys with a block number (``.N.``)
    next, everything else (the output projection, final norms) last; within each group runs of digits
    compare as numbers, so ``resblocks.2`` comes before ``resblocks.10``. Results list their keys in this
    order whatever the task vectors' own order (a safetensors file stores its keys alphabetically), so
    in-memory and on-disk inputs agree and per-layer plots read from input to output.

    Example:
        >>> keys = ["proj", "transformer.resblocks.10.mlp.c_fc.weight", "positional_embedding",
        ...         "transformer.resblocks.2.mlp.c_fc.weight"]
        >>> sorted(keys, key=depth_key)  # doctest: +NORMALIZE_WHITESPACE
        ['positional_embedding', 'transformer.resblocks.2.mlp.c_fc.weight',
         'transformer.resblocks.10.mlp.c_fc.weight', 'proj']
    """
    natural = tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key) if part)
    if _BLOCK.search(key):
        return 1, natural
    return (0 if "embed" in key.lower() else 2), natural


_BLOCK = re.compile(r"(?:^|\.)\d+\.")


def _names(tvs: list[TaskVector]) -> list[str]:
    return [tv.name if tv.name else f"task {index}" for index, tv in enumerate(tvs)]


def _stream(
    tvs: list[TaskVector], keys: list[str], device: torch.device, dtype: torch.dtype, progress: bool, description: str
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, [T, m, n])`` one key at a time on the compute device, checked for NaN and inf."""
    iterator: Any = keys
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(keys, desc=description, unit="key", leave=False)
    for key in iterator:
        deltas = torch.stack([tv[key].to(device=device, dtype=dtype) for tv in tvs])
        finite = torch.isfinite(deltas.reshape(len(tvs), -1)).all(dim=1)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            raise ValueError(
                f"Key '{key}' of task {index} ({tvs[index].describe()}) has non-finite values (NaN or inf): that "
                "expert diverged. Re-train it (lower the learning rate) or leave it out of the analysis."
            )
        yield key, deltas


# --- public entry points ---------------------------------------------------------------------------


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
