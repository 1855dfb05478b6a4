"""SCORE: Subspace COnflict-Resolving mErging.

Chaves, Zhou, Burkholz, Valle, Avila. "Bridging Domains through Subspace-Aware Model Merging", CVPR 2026,
arXiv:2603.05768. Data-free.

Notation, per matrix key: T tasks with updates Δ_t ∈ ℝ^{m×n}, r = min(m, n), k = ⌊r/T⌋.

1. SVD each task matrix, Δ_t = U_t S_t V_tᵀ.
2. Concatenate the k leading singular vectors of every task into U_cat (m×r) and V_catᵀ (r×n).
   Singular values are not used.
3. Shared orthogonal basis: U⊥ = polar(U_cat), V⊥ᵀ = polar(V_catᵀ) (as TSV-M).
4. Project each full task matrix into it: C_t = U⊥ᵀ Δ_t V⊥ ∈ ℝ^{r×r} (not diagonal).
5. Trim the large off-diagonal couplings: with O_t = C_t minus its diagonal (the r zeros stay in the
   statistics), μ_t and s_t the mean and unbiased standard deviation of all r² entries of O_t, keep an
   off-diagonal entry when |O_t[i, j] − μ_t| ≤ h_t = z·s_t/T (z·s_t without the /T).
6. Aggregate by sum: Σ* = Σ_t Trim(C_t), where Trim keeps the whole diagonal.
7. Reconstruct: Δ* = U⊥ Σ* V⊥ᵀ.

Cost per m×n key: T SVDs of m×n, two polar factors (SVDs of m×r and r×n), 2T + 2 GEMMs of m·n·r, T trims
of r² entries. The T tasks of a key go through each step as one batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_score.merging.registry import Factorizations, register_method
from lightning_score.merging.shared_basis import shared_orthogonal_basis, task_basis
from lightning_score.merging.task_matrices import LowRankUpdate, TaskMatrices

__all__ = ["VARIANTS", "aggregate", "project", "score_merge", "trim_mask"]

Variant = Literal["trimmed", "diagonal", "off_diagonal", "full"]
VARIANTS: tuple[str, ...] = ("trimmed", "diagonal", "off_diagonal", "full")
SIGN_CONVENTIONS: tuple[str, ...] = ("svd", "canonical")


def project(deltas: Tensor, U_perp: Tensor, Vh_perp: Tensor) -> Tensor:
    """Step 4: C_t = U⊥ᵀ Δ_t V⊥ for every task, ``[T, r, r]``."""
    return U_perp.mT @ deltas @ Vh_perp.mT


def trim_mask(C: Tensor, z: float, divide_by_tasks: bool, slots: int | None = None) -> Tensor:
    """Step 5: which off-diagonal entries of each C_t to keep (``[T, r, r]`` bool, diagonal False).

    O_t is C_t with its diagonal set to zero; μ_t, s_t are the mean and unbiased standard deviation of
    all r² entries of O_t (zeros included). An off-diagonal entry is kept when |O_t[i, j] − μ_t| ≤ h_t,
    h_t = z·s_t/T (or z·s_t): the small couplings stay, the large ones go.

    ``slots``: the basis's full size r when ``C`` holds only the q < r used slots of a basis whose others carry
    nothing (:func:`~lightning_score.merging.shared_basis.task_basis`): the statistics count the r² − q² zeros.
    """
    num_tasks, q, _ = C.shape
    off_diagonal = ~torch.eye(q, dtype=torch.bool, device=C.device)
    coupling = C * off_diagonal  # O_t
    flat = coupling.reshape(num_tasks, -1)
    if slots is None or slots == q:
        mean = flat.mean(dim=1).view(num_tasks, 1, 1)
        std = flat.std(dim=1, correction=1).view(num_tasks, 1, 1) if q > 1 else torch.zeros_like(mean)
    else:  # the same statistics over r² entries, r² − q² of them zero
        entries, zeros = slots * slots, slots * slots - q * q
        mean = (flat.sum(dim=1) / entries).view(num_tasks, 1, 1)
        squares = (coupling - mean).square().reshape(num_tasks, -1).sum(dim=1).view(num_tasks, 1, 1)
        std = ((squares + zeros * mean.square()) / (entries - 1)).sqrt()
    threshold = z * std / (num_tasks if divide_by_tasks else 1)
    return ((coupling - mean).abs() <= threshold) & off_diagonal


def aggregate(C: Tensor, variant: str, z: float, divide_by_tasks: bool, slots: int | None = None) -> Tensor:
    """Step 6: Σ* = Σ_t of the selected part of each C_t.

    ``trimmed``: diagonal + kept off-diagonal entries (the method). ``diagonal``: the diagonal only.
    ``off_diagonal``: the kept off-diagonal entries only. ``full``: every entry, untrimmed.
    """
    if variant == "full":
        return C.sum(dim=0)
    diagonal = torch.diag_embed(torch.diagonal(C, dim1=-2, dim2=-1).sum(dim=0))
    if variant == "diagonal":
        return diagonal
    kept = (C * trim_mask(C, z, divide_by_tasks, slots)).sum(dim=0)
    return kept if variant == "off_diagonal" else diagonal + kept


@register_method(
    "score",
    reference="Chaves et al., Bridging Domains through Subspace-Aware Model Merging (SCORE), CVPR 2026, "
    "arXiv:2603.05768",
    choices={"variant": VARIANTS, "divide_by_tasks": (True, False), "sign_convention": SIGN_CONVENTIONS},
    per_task_rank=True,
    low_rank=True,
)
def score_merge(
    deltas: Tensor | TaskMatrices,
    *,
    variant: Variant = "trimmed",
    z: float = 1.96,
    divide_by_tasks: bool = True,
    sign_convention: str = "svd",
    factors: Factorizations | None = None,
) -> Tensor | LowRankUpdate:
    """Project every task into a shared orthogonal basis and trim the large off-diagonal conflicts.

    Cost: T SVDs of m×n, two polar factors, 2T + 2 GEMMs of m·n·r, T trims of r×r; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key, or :class:`TaskMatrices` with LoRA experts' factors:
            then each task keeps k_t = min(k, ρ_t) leading vectors (``docs/methods.md``, "Rank-deficient tasks"),
            its SVD and projection come from its factors, and the dense stack is never built.
        variant: ``trimmed`` (the method, default), or the paper's ablations ``diagonal``,
            ``off_diagonal`` and ``full``. ``full`` is the intended Σ_t C_t: the authors' released code
            adds the number 1 to every entry in that branch instead, a bug this does not reproduce.
        z: Trimming width in standard deviations (1.96, the paper's setting for natural images).
        divide_by_tasks: Threshold z·s_t/T (default) rather than z·s_t (the paper's medical datasets).
        sign_convention: ``svd`` (default) keeps the singular vectors exactly as ``torch.linalg.svd``
            returns them, as the paper's code does. The trimming statistics are not
            invariant to the joint sign of a singular pair, and CPU and CUDA solvers choose signs
            differently, so ``canonical`` fixes them (largest entry of each u_i positive) for results that
            are identical on every backend.
        factors: Supplied by the engine from a :class:`~lightning_score.merging.FactorCache`: the tasks' SVDs,
            and the basis and projections of steps 1-4, computed once for these experts and shared by every
            variant and by TSV-M. The result is bit-identical without it.

    Returns:
        Δ* ``[m, n]``; for LoRA experts whose basis holds q < r used slots, Δ* as its factors (rank ≤ q).
    """
    if isinstance(deltas, TaskMatrices):
        U_perp, _, Vh_perp = task_basis(deltas, sign_convention)
        sigma = aggregate(deltas.project(U_perp, Vh_perp), variant, z, divide_by_tasks, min(deltas.shape))
        if U_perp.shape[1] < min(deltas.shape):  # the used slots only: the merge is of rank q, kept as factors
            return LowRankUpdate(U_perp, sigma @ Vh_perp)
        return U_perp @ sigma @ Vh_perp
    U_perp, _, Vh_perp = shared_orthogonal_basis(deltas, sign_convention, factors)  # singular values unused
    if factors is None:
        C = project(deltas, U_perp, Vh_perp)
    else:
        C = factors.reuse(deltas, ("score_projection", sign_convention), lambda: project(deltas, U_perp, Vh_perp))
    sigma = aggregate(C, variant, z, divide_by_tasks)
    return U_perp @ sigma @ Vh_perp
