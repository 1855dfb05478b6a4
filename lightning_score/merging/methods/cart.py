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

import torch
from torch import Tensor

from lightning_score.merging.keys import is_block_linear
from lightning_score.merging.registry import KeyMerger, register_method

__all__ = ["CARTMerge", "centred_low_rank_sum"]


def centred_low_rank_sum(deltas: Tensor, rank_ratio: float) -> Tensor:
    """Σ_t SVD_k(τ_t − τ̄) for one key's ``[T, m, n]`` slices."""
    centred = deltas - deltas.mean(dim=0, keepdim=True)
    k = max(1, int(rank_ratio * min(deltas.shape[-2:])))
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    return ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).sum(dim=0)


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

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """τ̄ + λ Σ_t SVD_k(c_t) on block linear layers, τ̄ on other matrix keys."""
        mean = deltas.mean(dim=0)
        if not (self.all_matrices or is_block_linear(key)):
            return mean
        return mean + self.coefficient * centred_low_rank_sum(deltas, self.rank_ratio)
