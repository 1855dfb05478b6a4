"""Iso-C and Iso-CTS: isotropic merging.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer. "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959. Data-free.

Both flatten the spectrum of the merged update so that no direction (and so no task) dominates.

* Iso-C: Δ_sum = Σ_t Δ_t = U S Vᵀ; Δ* = mean(S) · U Vᵀ.
* Iso-CTS: a common subspace (the top c directions of Δ_sum) plus, for each task, the top p directions of
  what the common subspace misses; the r slots are orthogonalised and the spectrum flattened as in Iso-C.
  With common fraction f: c₀ = ⌊f·r⌋, p = round((r − c₀)/T), c = r − T·p.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import register_method
from lightning_score.merging.svd import polar
from lightning_score.merging.task_matrices import RankDeficientError, TaskMatrices

__all__ = ["iso_c_merge", "iso_cts_merge", "iso_cts_sizes"]

_REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
    "ICML 2025, arXiv:2502.04959"
)


def _refuse_low_rank_sum(tasks: TaskMatrices, needed: int, what: str) -> None:
    """Raise when the tasks' known ranks leave directions ``what`` needs to the SVD solver's choice."""
    bound = tasks.rank_bound()
    if bound is not None and bound < needed:
        raise RankDeficientError(
            f"{what} needs {needed} singular directions of the experts' summed update, but these experts are "
            f"low rank (LoRA ranks {list(tasks.ranks)}: the sum has rank at most {bound}), so the other directions "
            "would be the SVD solver's arbitrary choice of null-space vectors, not a property of the experts. Merge "
            "LoRA experts with a method defined on low-rank updates (score, tsv, cart, knots), or with experts of "
            "higher rank."
        )


@register_method("iso_c", reference=_REFERENCE, low_rank=True)
def iso_c_merge(deltas: Tensor | TaskMatrices) -> Tensor:
    """Sum the tasks, then replace the sum's singular values by their mean (an isotropic spectrum).

    No options. Non-matrix keys get the mean. Cost: one SVD of m×n per key; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key, or :class:`TaskMatrices` (LoRA experts: summed
            without the stack; refused when their ranks add up to less than r = min(m, n), where the isotropic
            spectrum would fill the sum's null space with directions the solver picks).

    Returns:
        Δ* ``[m, n]``.
    """
    if isinstance(deltas, TaskMatrices):
        _refuse_low_rank_sum(deltas, min(deltas.shape), "iso_c")
        total = deltas.sum()
    else:
        total = deltas.sum(dim=0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    return S.mean() * (U @ Vh)


def iso_cts_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Return ``(c, p)``: the common subspace size and the per-task size for r slots."""
    common_floor = int(common_fraction * r)
    per_task = round((r - common_floor) / num_tasks)
    return max(r - num_tasks * per_task, 0), per_task


@register_method("iso_cts", reference=_REFERENCE, low_rank=True)
def iso_cts_merge(deltas: Tensor | TaskMatrices, *, common_fraction: float = 0.8) -> Tensor:
    """Iso-C on a common subspace plus task-specific directions it misses, then an isotropic spectrum.

    Non-matrix keys get the mean. Cost: one SVD of Δ_sum, T SVDs of the residuals and two polar factors
    per key; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key, or :class:`TaskMatrices` (LoRA experts: refused when
            the common subspace or a task's p directions would reach beyond the experts' ranks, into null-space
            directions the solver picks; otherwise merged from the dense matrices).
        common_fraction: The fraction f of the r slots reserved for the common subspace (0.8).

    Returns:
        Δ* ``[m, n]``.
    """
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"iso_cts: common_fraction must lie in [0, 1], got {common_fraction}.")
    if isinstance(deltas, TaskMatrices):
        c, p = iso_cts_sizes(min(deltas.shape), len(deltas), common_fraction)
        _refuse_low_rank_sum(deltas, c, "iso_cts's common subspace")
        if any(rank is not None and rank < p for rank in deltas.ranks):
            raise RankDeficientError(
                f"iso_cts keeps {p} task-specific directions per expert, more than the LoRA ranks "
                f"{list(deltas.ranks)}: the rest would be the solver's arbitrary null-space vectors. Raise "
                "common_fraction (fewer task-specific directions), or merge LoRA experts with score, tsv, cart or "
                "knots."
            )
        deltas = deltas.dense()
    num_tasks, m, n = deltas.shape
    r = min(m, n)
    c, p = iso_cts_sizes(r, num_tasks, common_fraction)
    U, S, Vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    U_c, s_c, Vh_c = U[:, :c], S[:c], Vh[:c]
    residuals = deltas - U_c @ (U_c.mT @ deltas)  # what the common subspace misses, per task
    U_t, S_t, Vh_t = torch.linalg.svd(residuals, full_matrices=False)
    U_cat = torch.cat([U_t[:, :, :p].permute(1, 0, 2).reshape(m, num_tasks * p), U_c], dim=1)
    s_cat = torch.cat([S_t[:, :p].reshape(-1), s_c])
    Vh_cat = torch.cat([Vh_t[:, :p, :].reshape(num_tasks * p, n), Vh_c], dim=0)
    return s_cat.mean() * (polar(U_cat) @ polar(Vh_cat))
