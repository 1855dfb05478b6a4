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

__all__ = ["iso_c_merge", "iso_cts_merge", "iso_cts_sizes"]

_REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
    "ICML 2025, arXiv:2502.04959"
)


@register_method("iso_c", reference=_REFERENCE)
def iso_c_merge(deltas: Tensor) -> Tensor:
    """Sum the tasks, then replace the sum's singular values by their mean (an isotropic spectrum).

    No options. Non-matrix keys get the mean. Cost: one SVD of m×n per key; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key.

    Returns:
        Δ* ``[m, n]``.
    """
    U, S, Vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    return S.mean() * (U @ Vh)


def iso_cts_sizes(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Return ``(c, p)``: the common subspace size and the per-task size for r slots."""
    common_floor = int(common_fraction * r)
    per_task = round((r - common_floor) / num_tasks)
    return max(r - num_tasks * per_task, 0), per_task


@register_method("iso_cts", reference=_REFERENCE)
def iso_cts_merge(deltas: Tensor, *, common_fraction: float = 0.8) -> Tensor:
    """Iso-C on a common subspace plus task-specific directions it misses, then an isotropic spectrum.

    Non-matrix keys get the mean. Cost: one SVD of Δ_sum, T SVDs of the residuals and two polar factors
    per key; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key.
        common_fraction: The fraction f of the r slots reserved for the common subspace (0.8).

    Returns:
        Δ* ``[m, n]``.
    """
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"iso_cts: common_fraction must lie in [0, 1], got {common_fraction}.")
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
