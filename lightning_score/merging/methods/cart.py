"""CART: Centered Arithmetic with Rank-reduced Task vectors. Data-free.

Choi, Kim, Lee, Hong. "Revisiting Weight Averaging for Model Merging", arXiv:2412.12153 (code:
github.com/JH-GEECS/CART).

Weight averaging implicitly centres the task vectors on their mean; CART keeps only the leading singular
directions of each centred vector and adds them back with a coefficient λ. Per block linear layer, with
τ̄ = (1/T) Σ_t τ_t and the centred c_t = τ_t − τ̄:

    Δ* = τ̄ + λ · Σ_t SVD_k(c_t),   k = max(1, int(rank_ratio · min(m, n))),

SVD_k the best rank-k approximation (the k leading singular triplets). Every other key, including the
matrix keys that are not block linear layers (``positional_embedding``, ``proj``), gets τ̄: the authors'
code leaves those centred vectors whole, and Σ_t c_t = 0.

Reference implementation: JH-GEECS/CART@37bb668, ``src/merging.py``, ``StaticMergeModule._merge_weights("CART")``
with ``_get_truncated_task_vectors`` (the block linear layers are the keys with "attn" or "mlp" and neither "ln"
nor "bias" in their name; k = max(1, int(rank_ratio · r))); this computes it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_score.merging.keys import is_block_linear
from lightning_score.merging.low_rank import LowRankUpdate, factor_svd
from lightning_score.merging.registry import KeyMerger, register_method
from lightning_score.merging.task_matrices import TaskMatrices

__all__ = ["CARTMerge", "centred_low_rank_sum"]


def centred_low_rank_sum(deltas: Tensor | TaskMatrices, rank_ratio: float) -> Tensor:
    """Σ_t SVD_k(τ_t − τ̄) for one key's ``[T, m, n]`` slices.

    For LoRA experts (:class:`TaskMatrices` whose tasks are all factors), each centred c_t = Σ_j (δ_tj − 1/T)·Δ_j is
    itself a low-rank update, [w_t1·s_1·B_1 | … | w_tT·s_T·B_T] [A_1; …; A_T] of rank ≤ Σ_j ρ_j, whose thin SVD comes
    from its factors; beyond its rank the singular values are zero, so SVD_k is exact whatever k.
    """
    if isinstance(deltas, TaskMatrices):
        if not all(isinstance(part, LowRankUpdate) for part in deltas.parts):
            return centred_low_rank_sum(deltas.dense(), rank_ratio)
        return _centred_low_rank_sum_of_factors(deltas, rank_ratio)
    centred = deltas - deltas.mean(dim=0, keepdim=True)
    k = max(1, int(rank_ratio * min(deltas.shape[-2:])))
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    return ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).sum(dim=0)


def _centred_low_rank_sum_of_factors(tasks: TaskMatrices, rank_ratio: float) -> Tensor:
    parts = [part for part in tasks.parts if isinstance(part, LowRankUpdate)]
    num_tasks, k = len(parts), max(1, int(rank_ratio * min(tasks.shape)))
    A = torch.cat([part.A for part in parts], dim=0)
    total = torch.zeros(tasks.shape, dtype=tasks.dtype, device=tasks.device)
    for t in range(num_tasks):
        weights = [(1.0 if j == t else 0.0) - 1.0 / num_tasks for j in range(num_tasks)]
        B = torch.cat([w * part.scale * part.B for w, part in zip(weights, parts, strict=True)], dim=1)
        U, S, Vh = factor_svd(LowRankUpdate(B, A))
        total += (U[:, :k] * S[:k]) @ Vh[:k]
    return total


@register_method(
    "cart",
    reference="Choi, Kim, Lee, Hong, Revisiting Weight Averaging for Model Merging, arXiv:2412.12153",
)
class CARTMerge(KeyMerger):
    """The task vectors' mean plus λ times the sum of their centred, rank-reduced deviations from it.

    Defaults: the CART authors' released ViT-B/32 eight-task configuration (rank ratio 0.12, λ = 2.0); the
    SCORE authors' code does not run CART. Cost per block linear layer: T SVDs of m×n; memory O(T·m·n).

    Args:
        rank_ratio: The kept fraction of each layer's r = min(m, n) singular directions (0.12).
        coefficient: λ, the weight of the low-rank deviations (2.0).
        all_matrices: Also rank-reduce the matrix keys that are not block linear layers (False: they get the
            mean, as in the authors' code); for architectures whose layer names differ from open_clip's.
    """

    def __init__(self, *, rank_ratio: float = 0.12, coefficient: float = 2.0, all_matrices: bool = False) -> None:
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"cart: rank_ratio must lie in (0, 1], got {rank_ratio}.")
        self.rank_ratio, self.coefficient, self.all_matrices = rank_ratio, coefficient, all_matrices

    def low_rank_keys(self, keys: Sequence[str]) -> list[str]:
        """Every key: the mean and the centred SVDs of LoRA experts come from their factors."""
        return list(keys)

    def merge_key(self, key: str, deltas: Tensor | TaskMatrices) -> Tensor:
        """τ̄ + λ Σ_t SVD_k(c_t) on block linear layers, τ̄ on other matrix keys."""
        mean = deltas.sum() / len(deltas) if isinstance(deltas, TaskMatrices) else deltas.mean(dim=0)
        if not (self.all_matrices or is_block_linear(key)):
            return mean
        return mean + self.coefficient * centred_low_rank_sum(deltas, self.rank_ratio)
