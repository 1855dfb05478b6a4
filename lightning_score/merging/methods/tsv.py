"""TSV-M: Task Singular Vectors merge.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà. "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025, arXiv:2412.00081. Data-free.

Per matrix key, with Δ_t = U_t S_t V_tᵀ and k = ⌊r/T⌋: keep each task's k leading singular triplets,
concatenate them (U_cat, s_cat = [S_1[:k], …, S_T[:k], 0], V_catᵀ), orthogonalise the vectors by their
polar factors and put the singular values back: Δ* = U⊥ · diag(s_cat) · V⊥ᵀ. SCORE's steps 1-3.
"""

from __future__ import annotations

from torch import Tensor

from lightning_score.merging.registry import Factorizations, register_method
from lightning_score.merging.shared_basis import shared_orthogonal_basis, task_basis
from lightning_score.merging.task_matrices import LowRankUpdate, TaskMatrices

__all__ = ["tsv_merge"]


@register_method(
    "tsv",
    reference="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025, "
    "arXiv:2412.00081",
    per_task_rank=True,
    low_rank=True,
)
def tsv_merge(deltas: Tensor | TaskMatrices, *, factors: Factorizations | None = None) -> Tensor | LowRankUpdate:
    """Keep each task's leading singular triplets and decorrelate them by orthogonalising the vectors.

    No options (the rank budget is k = ⌊r/T⌋). Non-matrix keys get the mean. The result does not depend on
    the signs the SVD solver picks. Cost: T SVDs of m×n and two polar factors per key; memory O(T·m·n).

    Args:
        deltas: ``[T, m, n]`` the T task matrices of one key, or :class:`TaskMatrices` with LoRA experts' factors:
            then each task keeps k_t = min(k, ρ_t) triplets (``docs/methods.md``, "Rank-deficient tasks"), computed
            from its factors in O((m + n)·ρ²), and the dense stack is never built.
        factors: Supplied by the engine from a :class:`~lightning_score.merging.FactorCache`: the tasks' SVDs
            and the shared basis (the one SCORE builds), computed once for these experts. The result is
            bit-identical without it.

    Returns:
        Δ* ``[m, n]``; for LoRA experts whose basis holds q < r used slots, Δ* as its factors (rank ≤ q).
    """
    if isinstance(deltas, TaskMatrices):
        U_perp, s_cat, Vh_perp = task_basis(deltas, "svd")
        if U_perp.shape[1] < min(deltas.shape):  # the used slots only: the merge is of rank q, kept as factors
            return LowRankUpdate(U_perp * s_cat, Vh_perp)
    else:
        U_perp, s_cat, Vh_perp = shared_orthogonal_basis(deltas, "svd", factors)
    return (U_perp * s_cat) @ Vh_perp
