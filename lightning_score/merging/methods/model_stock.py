"""Model Stock: interpolate between the experts' average and the pre-trained weights, per layer. Data-free.

Jang, Yun, Han. "Model Stock: All We Need Is Just a Few Fine-Tuned Models", ECCV 2024, arXiv:2403.19522.

Per layer (key), with T fine-tuned updates τ_t and their mean τ̄, the merged weights are
θ = t·(θ₀ + τ̄) + (1 − t)·θ₀, that is Δ* = t·τ̄, with

    t = T·cos θ / ((T − 1)·cos θ + 1 + ε),

θ the angle between fine-tuned updates. The paper derives t assuming every pair of updates meets at the same
angle. The authors released no code (naver-ai/model-stock holds none); the one public implementation,
tanganke/fusion_bench (read at 20dcc3b; the issue's 54c9e8c computes the same),
``fusion_bench/method/model_stock/model_stock.py`` (``compute_angle``, ``compute_ratio``), takes for T ≥ 2
updates the **mean of the pairwise angles**, cos_ij = ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖ + ε) clamped to [−1, 1],
θ = mean_{i<j} arccos(cos_ij), with ε = 1e-8 in the cosine and in the ratio's denominator: that is the default
(``angle="mean_angle"``, ``eps=1e-8``). ``angle="mean_cosine"`` takes cos θ = the mean of the pairwise cosines
instead (what the inner products of an isotropic model of the updates give, and what this package computed
before; with ``eps=0`` it has no ε artefacts on keys whose updates are tiny, where ε = 1e-8 is comparable to
‖τ_i‖‖τ_j‖ and shrinks t). A pair with a zero update has cosine 0. One expert gives t = 1 (its own update; the
reference refuses T < 2). Where the denominator is not positive (updates that cancel, which the reference
divides by), t = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import register_method

__all__ = ["ANGLES", "interpolation_ratio", "model_stock_merge", "pairwise_cosines", "shared_cosine"]

ANGLES: tuple[str, ...] = ("mean_angle", "mean_cosine")


def pairwise_cosines(deltas: Tensor, eps: float = 0.0) -> Tensor:
    """The cosines ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖ + ε) over pairs i < j of one key's T slices (0 for a zero update)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    outer = norms.unsqueeze(0) * norms.unsqueeze(1) + eps
    gram = flat @ flat.mT
    cosines = torch.where(outer > 0, gram / outer.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(gram))
    pairs = torch.triu_indices(flat.shape[0], flat.shape[0], offset=1, device=flat.device)
    return cosines[pairs[0], pairs[1]]


def shared_cosine(deltas: Tensor, angle: str = "mean_angle", eps: float = 1e-8) -> Tensor:
    """The cos θ of one key's T ≥ 2 slices: the cosine of the mean pairwise angle, or the mean pairwise cosine.

    Example:
        >>> deltas = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> round(shared_cosine(deltas, "mean_angle", eps=0.0).item(), 12)  # angles 0°, 90°, 90°: mean 60°
        0.5
        >>> round(shared_cosine(deltas, "mean_cosine", eps=0.0).item(), 12)  # cosines 1, 0, 0
        0.333333333333
    """
    cosines = pairwise_cosines(deltas, eps)
    if angle == "mean_cosine":
        return cosines.mean()
    return torch.cos(torch.arccos(cosines.clamp(-1.0, 1.0)).mean())


def interpolation_ratio(cosine: Tensor, num_tasks: int, eps: float = 1e-8) -> Tensor:
    """The ratio t = T·cos θ / ((T − 1)·cos θ + 1 + ε), and 0 where the denominator is not positive."""
    denominator = (num_tasks - 1) * cosine + 1 + eps
    return torch.where(denominator > 0, num_tasks * cosine / denominator.clamp_min(torch.finfo(cosine.dtype).tiny), 0)


@register_method(
    "model_stock",
    reference="Jang, Yun, Han, Model Stock: All We Need Is Just a Few Fine-Tuned Models, ECCV 2024, arXiv:2403.19522",
    scope="all",
    choices={"angle": ANGLES},
)
def model_stock_merge(deltas: Tensor, *, angle: str = "mean_angle", eps: float = 1e-8) -> Tensor:
    """Per layer, the experts' mean update shrunk toward the pre-trained weights by the angle between updates.

    Defaults: FusionBench's ``model_stock`` (see the module docstring); the SCORE authors list Model Stock
    among their merge functions but their released code has no implementation of it. Cost: the T×T inner
    products of each key, O(T²·P); memory one key's T slices.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.
        angle: ``"mean_angle"`` (default: cos of the mean pairwise angle, FusionBench) or ``"mean_cosine"`` (the
            mean of the pairwise cosines).
        eps: Added to the norm products of the cosines and to the ratio's denominator (1e-8, FusionBench's).

    Returns:
        t·τ̄ for that key.
    """
    if not eps >= 0.0:
        raise ValueError(f"model_stock: eps must be >= 0, got {eps}.")
    num_tasks = deltas.shape[0]
    mean = deltas.mean(dim=0)
    if num_tasks == 1:
        return mean
    return interpolation_ratio(shared_cosine(deltas, angle, eps), num_tasks, eps).to(mean.dtype) * mean
