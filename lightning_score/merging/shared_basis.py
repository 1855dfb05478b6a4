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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_score.merging.key_factors import KeyFactors

__all__ = [
    "canonicalize_signs",
    "concatenate_leading",
    "leading_triplets",
    "polar",
    "rank_budget",
    "shared_orthogonal_basis",
    "thin_svd",
]


def rank_budget(shape: tuple[int, ...] | torch.Size, num_tasks: int) -> tuple[int, int]:
    """Return ``(r, k)``: r = min(m, n) slots, k = ⌊r/T⌋ of them per task."""
    r = min(shape[-2], shape[-1])
    return r, r // num_tasks


def thin_svd(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD Δ = U S Vᵀ of each matrix in a batch: ``U [..., m, r]``, ``S [..., r]``, ``Vh [..., r, n]``.

    This is ``torch.linalg.svd(full_matrices=False)`` on the matrices as given (never on their
    transposes), so that the singular vectors, signs included, are the ones a plain implementation gets. On
    CPU the batch is a loop of LAPACK calls either way; calling them one by one gives the same bits and
    keeps LAPACK's own threading (batched wide matrices were about 20 % slower here).
    """
    if deltas.device.type != "cpu" or deltas.ndim == 2:
        return torch.linalg.svd(deltas, full_matrices=False)
    parts = [torch.linalg.svd(matrix, full_matrices=False) for matrix in deltas]
    return tuple(torch.stack(factor) for factor in zip(*parts, strict=True))  # type: ignore[return-value]


def canonicalize_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive.

    A singular pair is defined only up to a joint sign, and LAPACK, cuSOLVER and MAGMA choose
    differently. SCORE's trimming statistics (the mean of the off-diagonal coefficients) are not
    invariant to those signs, so this fixed convention is what makes results identical across backends.
    """
    index = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, index))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.mT


def leading_triplets(deltas: Tensor, k: int, sign_convention: str = "svd") -> tuple[Tensor, Tensor, Tensor]:
    """Step 1 for T task matrices ``[T, m, n]``: each task's k leading singular triplets.

    Args:
        deltas: The T task matrices of one key.
        k: How many leading triplets of each task.
        sign_convention: ``"svd"`` keeps ``torch.linalg.svd``'s singular vectors as they are;
            ``"canonical"`` applies :func:`canonicalize_signs` first.

    Returns:
        ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``.
    """
    U, S, Vh = thin_svd(deltas)
    if sign_convention == "canonical":
        U, Vh = canonicalize_signs(U, Vh)
    return U[..., :k], S[..., :k], Vh[..., :k, :]


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
    deltas: Tensor, sign_convention: str = "svd", factors: KeyFactors | None = None
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


def _basis(deltas: Tensor, sign_convention: str, factors: KeyFactors | None) -> tuple[Tensor, Tensor, Tensor]:
    _, k = rank_budget(deltas.shape, deltas.shape[0])
    if factors is None:
        U, S, Vh = leading_triplets(deltas, k, sign_convention)
    else:
        U, S, Vh = factors.leading(deltas, k, sign_convention)
    U_cat, s_cat, Vh_cat = concatenate_leading(U, S, Vh, k)
    return polar(U_cat), s_cat, polar(Vh_cat)


def polar(A: Tensor) -> Tensor:
    """Return the polar factor P Qᵀ of A = P S Qᵀ (thin SVD): the nearest matrix with orthonormal columns (rows).

    Computed from the SVD, as the papers define it: the concatenated factors are often badly conditioned
    (the experts' leading directions overlap, which is the very conflict SCORE resolves), where cheaper
    Gram-matrix formulas lose accuracy, and the SVD completes zero-padded slots with an orthonormal basis.

    Args:
        A: ``[..., m, n]``.

    Returns:
        ``[..., m, n]`` with orthonormal columns (m ≥ n) or rows (m < n).
    """
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh
