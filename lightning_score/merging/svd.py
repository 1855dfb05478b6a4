"""Per-task singular triplets and polar factors: the linear algebra SCORE, TSV-M, Iso and ESM start from.

Notation, per matrix key: T tasks with updates Δ_t ∈ ℝ^{m×n}, r = min(m, n), per-task rank budget
k = ⌊r/T⌋ (:func:`rank_budget`). :func:`thin_svd` factorizes each task, Δ_t = U_t S_t V_tᵀ, exactly as
``torch.linalg.svd`` does (signs included, unless :func:`canonicalize_signs` fixes them);
:func:`leading_triplets` keeps each task's k leading triplets; :func:`polar` is the nearest matrix with
orthonormal columns (rows). Every function takes batched tensors (leading dimensions are batch dimensions).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["canonicalize_signs", "leading_triplets", "polar", "rank_budget", "thin_svd"]


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
