"""One key's T task matrices as the SVD methods read them: dense, or as factors Δ_t = s_t·B_t·A_t (LoRA experts).

Notation, per matrix key: T tasks with updates Δ_t ∈ ℝ^{m×n}, r = min(m, n), per-task rank budget k = ⌊r/T⌋. A task
kept as factors has a known rank bound ρ_t (its factors' inner dimension), and a dense task may be given one (the
same experts densified, see :meth:`TaskMatrices.densified`).

Rank-deficient tasks (``docs/methods.md``, "Rank-deficient tasks"): when k > ρ_t, singular vectors beyond ρ_t lie in
the task's null space, where any solver may return any orthonormal set. A task of known rank contributes its
k_t = min(k, ρ_t) leading triplets, and its other slots stay zero (as the last r − T·k slots do when T·k < r). A task
of unknown rank (a dense task vector) contributes k, exactly as before.

Through the factors, each task's thin SVD costs O((m + n)·ρ_t²) (:func:`~lightning_score.merging.low_rank.factor_svd`)
and its projection onto a basis O((m + n)·ρ_t·q); the T×m×n stack is never built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_score.merging.low_rank import LowRankUpdate, factor_svd
from lightning_score.merging.svd import canonicalize_signs

__all__ = ["LowRankUpdate", "RankDeficientError", "TaskMatrices", "as_dense"]

Triplets = tuple[Tensor, Tensor, Tensor]


class RankDeficientError(ValueError):
    """A method's result on these tasks would depend on the SVD solver's choice of null-space vectors."""


@dataclass(frozen=True)
class TaskMatrices:
    """The T task matrices of one key, each a dense ``[m, n]`` tensor or a :class:`LowRankUpdate`.

    Attributes:
        parts: One per task, on the compute device in the compute dtype.
        ranks: Each task's known rank bound ρ_t (None: unknown, a dense task vector). A factor task's is its ρ.

    Example:
        >>> import torch
        >>> from lightning_score.merging.low_rank import LowRankUpdate
        >>> lora = LowRankUpdate(torch.randn(6, 2), torch.randn(2, 4))
        >>> tasks = TaskMatrices.of([lora, torch.randn(6, 4)])
        >>> tasks.shape, tasks.ranks, tasks.dense().shape
        ((6, 4), (2, None), torch.Size([2, 6, 4]))
        >>> [U.shape[-1] for U, _, _ in tasks.leading(k=3)]  # k_t = min(k, ρ_t)
        [2, 3]
    """

    parts: tuple[Tensor | LowRankUpdate, ...]
    ranks: tuple[int | None, ...]

    @classmethod
    def of(cls, parts: Sequence[Tensor | LowRankUpdate]) -> TaskMatrices:
        """The tasks as given: a factor task's rank is its ρ, a dense task's unknown."""
        ranks = tuple(part.rank if isinstance(part, LowRankUpdate) else None for part in parts)
        shapes = {part.shape if isinstance(part, LowRankUpdate) else tuple(part.shape) for part in parts}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"TaskMatrices needs T matrices of one shape [m, n]; got shapes {sorted(shapes)}.")
        return cls(tuple(parts), ranks)

    def densified(self) -> TaskMatrices:
        """The same tasks as dense matrices, keeping their known ranks (the dense path of the same definition)."""
        return TaskMatrices(tuple(as_dense(part) for part in self.parts), self.ranks)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        first = self.parts[0]
        return first.shape if isinstance(first, LowRankUpdate) else (first.shape[0], first.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        first = self.parts[0]
        return first.B.dtype if isinstance(first, LowRankUpdate) else first.dtype

    @property
    def device(self) -> torch.device:
        """The compute device."""
        first = self.parts[0]
        return first.B.device if isinstance(first, LowRankUpdate) else first.device

    def __len__(self) -> int:
        return len(self.parts)

    def dense(self) -> Tensor:
        """The ``[T, m, n]`` stack (for methods that read dense matrices: built one key at a time)."""
        return torch.stack([as_dense(part) for part in self.parts])

    def sum(self) -> Tensor:
        """Σ_t Δ_t as one dense ``[m, n]`` matrix, without the stack."""
        total = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for part in self.parts:
            total += as_dense(part)
        return total

    def budgets(self, k: int) -> list[int]:
        """k_t = min(k, ρ_t) per task (k where the rank is unknown)."""
        return [k if rank is None else min(k, rank) for rank in self.ranks]

    def spans_own_columns(self, k: int) -> bool:
        """Whether every task's k_t leading vectors span all of it: every rank known and at most k.

        Then each Δ_t lies in the span of its kept vectors, and the zero slots of a shared basis carry nothing.
        """
        return all(rank is not None and rank <= k for rank in self.ranks)

    def rank_bound(self) -> int | None:
        """An upper bound of rank(Σ_t Δ_t): Σ_t ρ_t when every rank is known, else None."""
        return None if None in self.ranks else sum(rank for rank in self.ranks if rank is not None)

    def leading(self, k: int, sign_convention: str = "svd") -> list[Triplets]:
        """Each task's k_t = min(k, ρ_t) leading singular triplets ``U [m, k_t]``, ``S [k_t]``, ``Vh [k_t, n]``.

        A factor task's come from its factors; a dense task's from ``torch.linalg.svd`` of its matrix, as
        :func:`~lightning_score.merging.svd.leading_triplets` computes them.
        """
        out = []
        for part, budget in zip(self.parts, self.budgets(k), strict=True):
            if isinstance(part, LowRankUpdate):
                U, S, Vh = factor_svd(part)
            else:
                U, S, Vh = torch.linalg.svd(part, full_matrices=False)
            if sign_convention == "canonical":
                U, Vh = canonicalize_signs(U, Vh)
            out.append((U[:, :budget], S[:budget], Vh[:budget]))
        return out

    def project(self, U: Tensor, Vh: Tensor) -> Tensor:
        """Uᵀ Δ_t V for every task, ``[T, q, q]`` for a basis ``U [m, q]``, ``Vh [q, n]``; factors stay factors."""
        out = []
        for part in self.parts:
            if isinstance(part, LowRankUpdate):
                out.append(((U.mT @ part.B) * part.scale) @ (part.A @ Vh.mT))
            else:
                out.append(U.mT @ part @ Vh.mT)
        return torch.stack(out)


def as_dense(part: Tensor | LowRankUpdate) -> Tensor:
    """One task's (or one merge's) matrix dense, computed where its factors are: in their dtype, on their device."""
    if isinstance(part, LowRankUpdate):
        return (part.B @ part.A) * part.scale  # in the factors' (compute) dtype, on their device
    return part
