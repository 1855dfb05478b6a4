"""The shared orthogonal basis of TSV-M and SCORE (SCORE's steps 1-3).

Notation, per matrix key: T tasks with updates Δ_t ∈ ℝ^{m×n}, r = min(m, n), per-task rank budget
k = ⌊r/T⌋. Each task contributes its k leading singular vectors; the concatenations

    U_cat = [U_1[:, :k] | … | U_T[:, :k] | 0] ∈ ℝ^{m×r},   V_catᵀ = [V_1ᵀ[:k]; …; V_Tᵀ[:k]; 0] ∈ ℝ^{r×n}

are orthogonalised by their polar factors, U⊥ = polar(U_cat) and V⊥ᵀ = polar(V_catᵀ). When T·k < r the
last r − T·k slots are zero, and the polar factor completes them with some orthonormal basis.

Every function here takes batched tensors (leading dimensions are batch dimensions), so one call
serves all T tasks of a key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import Factorizations
from lightning_score.merging.svd import leading_triplets, polar, rank_budget
from lightning_score.merging.task_matrices import TaskMatrices

__all__ = ["concatenate_leading", "shared_orthogonal_basis", "task_basis"]


def concatenate_leading(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate each task's k leading singular triplets into r = min(m, n) slots (zero-padded).

    Args:
        U: ``[T, m, q]`` left singular vectors of the T tasks (q ≥ k: all r of them, or the leading ones).
        S: ``[T, q]`` singular values.
        Vh: ``[T, q, n]`` right singular vectors (as rows).
        k: Per-task rank budget.

    Returns:
        ``U_cat [m, r]``, ``s_cat [r]`` and ``V_catᵀ [r, n]``; task t fills slots t·k … (t+1)·k − 1.
    """
    num_tasks, m, _ = U.shape
    n = Vh.shape[-1]
    r = min(m, n)
    U_cat, s_cat, Vh_cat = U.new_zeros(m, r), S.new_zeros(r), Vh.new_zeros(r, n)
    used = num_tasks * k
    U_cat[:, :used] = U[:, :, :k].permute(1, 0, 2).reshape(m, used)
    s_cat[:used] = S[:, :k].reshape(used)
    Vh_cat[:used] = Vh[:, :k, :].reshape(used, n)
    return U_cat, s_cat, Vh_cat


def shared_orthogonal_basis(
    deltas: Tensor, sign_convention: str = "svd", factors: Factorizations | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-3 for T task matrices ``[T, m, n]``: U⊥ ``[m, r]``, s_cat ``[r]``, V⊥ᵀ ``[r, n]``.

    Args:
        deltas: The T task matrices of one key.
        sign_convention: ``"svd"`` keeps ``torch.linalg.svd``'s singular vectors as they are;
            ``"canonical"`` applies :func:`canonicalize_signs` first.
        factors: Precomputed per-task SVDs and bases of these experts (from a
            :class:`~lightning_score.merging.FactorCache`); the result is bit-identical without them.
    """
    if factors is None:
        return _basis(deltas, sign_convention, None)
    return factors.reuse(deltas, ("shared_basis", sign_convention), lambda: _basis(deltas, sign_convention, factors))


def _basis(deltas: Tensor, sign_convention: str, factors: Factorizations | None) -> tuple[Tensor, Tensor, Tensor]:
    _, k = rank_budget(deltas.shape, deltas.shape[0])
    if factors is None:
        U, S, Vh = leading_triplets(deltas, k, sign_convention)
    else:
        U, S, Vh = factors.leading(deltas, k, sign_convention)
    U_cat, s_cat, Vh_cat = concatenate_leading(U, S, Vh, k)
    return polar(U_cat), s_cat, polar(Vh_cat)


def task_basis(tasks: TaskMatrices, sign_convention: str = "svd") -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-3 for tasks of known rank (LoRA experts): U⊥ ``[m, q]``, s_cat ``[q]``, V⊥ᵀ ``[q, n]``.

    Task t contributes its k_t = min(k, ρ_t) leading triplets and leaves the rest of its k slots zero
    (:class:`~lightning_score.merging.task_matrices.TaskMatrices`). When every task lies in the span of its kept
    vectors (every ρ_t known and ≤ k), the zero slots carry nothing for any task: their columns of U⊥ are orthogonal
    to every Δ_t, and their singular values are zero. The basis then holds the q = Σ_t k_t used slots only, task
    after task (the polar factor commutes with reordering the slots), which is what makes the factor path cheap.
    Otherwise it has the r slots of :func:`concatenate_leading`'s layout, task t in slots t·k … t·k + k_t − 1.

    Args:
        tasks: The T task matrices of one key.
        sign_convention: As in :func:`shared_orthogonal_basis`.
    """
    (m, n), num_tasks = tasks.shape, len(tasks)
    r, k = rank_budget((m, n), num_tasks)
    triplets = tasks.leading(k, sign_convention)
    if tasks.spans_own_columns(k):
        U_cat = torch.cat([U for U, _, _ in triplets], dim=1)
        s_cat = torch.cat([S for _, S, _ in triplets])
        Vh_cat = torch.cat([Vh for _, _, Vh in triplets], dim=0)
    else:
        U_cat, s_cat = triplets[0][0].new_zeros(m, r), triplets[0][1].new_zeros(r)
        Vh_cat = triplets[0][2].new_zeros(r, n)
        for t, (U, S, Vh) in enumerate(triplets):
            used = slice(t * k, t * k + S.shape[0])
            U_cat[:, used], s_cat[used], Vh_cat[used] = U, S, Vh
    return polar(U_cat), s_cat, polar(Vh_cat)
