"""Model Stock: interpolate between the experts' average and the pre-trained weights, per layer. Data-free.

Jang, Yun, Han. "Model Stock: All We Need Is Just a Few Fine-Tuned Models", ECCV 2024, arXiv:2403.19522.

Per layer (key), with T fine-tuned updates τ_t and their mean τ̄, the merged weights are
θ = t·(θ₀ + τ̄) + (1 − t)·θ₀, that is Δ* = t·τ̄, with

    t = T·cos θ / (1 + (T − 1)·cos θ),

θ the angle between fine-tuned updates. The paper derives t assuming every pair of updates meets at the
same angle; with more than two experts, cos θ here is the mean of the pairwise cosines
cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖) over i < j (a pair with a zero update counts as cosine 0). One
expert gives t = 1 (its own update). The mean pairwise cosine is at least −1/(T − 1), so the denominator
is not negative; where it is 0 (updates that cancel exactly), t = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import register_method

__all__ = ["interpolation_ratio", "mean_pairwise_cosine", "model_stock_merge"]


def mean_pairwise_cosine(deltas: Tensor) -> Tensor:
    """The mean over pairs i < j of cos(τ_i, τ_j) for one key's T slices (0-d tensor; needs T ≥ 2)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    gram = flat @ flat.mT
    outer = norms.unsqueeze(0) * norms.unsqueeze(1)
    cosines = torch.where(outer > 0, gram / outer.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(gram))
    pairs = torch.triu_indices(flat.shape[0], flat.shape[0], offset=1, device=flat.device)
    return cosines[pairs[0], pairs[1]].mean()


def interpolation_ratio(cosine: Tensor, num_tasks: int) -> Tensor:
    """The ratio t = T·cos θ / (1 + (T − 1)·cos θ), and 0 where the denominator is 0."""
    denominator = 1 + (num_tasks - 1) * cosine
    return torch.where(denominator > 0, num_tasks * cosine / denominator.clamp_min(torch.finfo(cosine.dtype).tiny), 0)


@register_method(
    "model_stock",
    reference="Jang, Yun, Han, Model Stock: All We Need Is Just a Few Fine-Tuned Models, ECCV 2024, arXiv:2403.19522",
    scope="all",
)
def model_stock_merge(deltas: Tensor) -> Tensor:
    """Per layer, the experts' mean update shrunk toward the pre-trained weights by the angle between updates.

    No options (the SCORE authors list Model Stock among their merge functions but their released code has no
    implementation of it: this is the paper's rule). Cost: the T×T inner products of each key, O(T²·P);
    memory one key's T slices.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.

    Returns:
        t·τ̄ for that key.
    """
    num_tasks = deltas.shape[0]
    mean = deltas.mean(dim=0)
    if num_tasks == 1:
        return mean
    return interpolation_ratio(mean_pairwise_cosine(deltas), num_tasks).to(mean.dtype) * mean
