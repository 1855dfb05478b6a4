"""Step 2 of the analysis, one matrix key at a time: the batched SVD, effective ranks, SAR of every ordered pair."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.analysis.keys import _check_energy

__all__ = ["effective_rank", "key_alignment"]


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
