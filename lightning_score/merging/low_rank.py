"""Low-rank task updates Δ = s·B·A (a LoRA expert's key) and their exact thin SVD from the factors.

Notation: B ∈ ℝ^{m×ρ}, A ∈ ℝ^{ρ×n}, a scale s (PEFT's ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA),
ρ ≪ min(m, n). The dense update is never needed to factorize it:

1. QR of the factors: B = Q_B R_B (Q_B ∈ ℝ^{m×ρ}), Aᵀ = Q_A R_A (Q_A ∈ ℝ^{n×ρ}).
2. The core K = s·R_B R_Aᵀ ∈ ℝ^{ρ×ρ}, so that Δ = Q_B K Q_Aᵀ.
3. SVD of the core, K = U_K S V_Kᵀ; then Δ = (Q_B U_K) S (Q_A V_K)ᵀ is a thin SVD of Δ.

This is exact (Q_B and Q_A have orthonormal columns, so the singular values of Δ are those of K) and costs
O((m + n)·ρ²) instead of O(m·n·min(m, n)) for the SVD of the dense m×n update. A task whose factors are rank
deficient (a zero column of B, say) gives zero singular values, which :func:`factor_svd` reports as such.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.utilities.low_rank import LowRankUpdate, add_updates

__all__ = ["LowRankUpdate", "add_updates", "factor_svd"]


def factor_svd(update: LowRankUpdate, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD Δ = U S Vᵀ of s·B·A from its factors (steps 1-3 of the module docstring).

    Args:
        update: The factors.
        dtype: The computation dtype (default the factors' common dtype; use float64 for a reference).

    Returns:
        ``U [m, c]``, ``S [c]`` (descending, non-negative), ``Vh [c, n]`` with c = min(ρ, m, n): the c leading
        singular triplets of Δ (those beyond its rank have S = 0). U has orthonormal columns, Vh orthonormal rows.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> update = LowRankUpdate(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), scale=2.0)
        >>> U, S, Vh = factor_svd(update, dtype=torch.float64)
        >>> dense = update.dense(torch.float64)
        >>> bool(torch.allclose(U @ torch.diag(S) @ Vh, dense))
        True
        >>> bool(torch.allclose(S, torch.linalg.svdvals(dense)[:2]))
        True
    """
    dtype = dtype or torch.promote_types(update.B.dtype, update.A.dtype)
    Q_B, R_B = torch.linalg.qr(update.B.to(dtype))
    Q_A, R_A = torch.linalg.qr(update.A.to(dtype).mT)
    core = (R_B @ R_A.mT) * update.scale
    U_K, S, Vh_K = torch.linalg.svd(core, full_matrices=False)
    return Q_B @ U_K, S, Vh_K @ Q_A.mT
