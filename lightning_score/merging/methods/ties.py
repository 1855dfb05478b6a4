"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023, arXiv:2306.01708. Data-free.

Over the whole model, flattened (every key, not per key):

1. Trim: keep each task's top ``density`` fraction of entries by magnitude over the P entries of the
   flattened model: the threshold is the k-th smallest |τ_t| (1-indexed, ``torch.kthvalue``'s convention)
   with k = P − int(P·density), as the authors' released code computes it; entries with |τ_t| ≥ threshold
   are kept (ties too), so int(P·density) + 1 entries survive when the magnitudes are distinct. Zero the rest.
2. Elect: γ = sign(Σ_t trimmed τ_t); entries where that sum is 0 take the sign of Σ γ over the model.
3. Disjoint merge: per entry, the mean of the trimmed entries whose sign equals γ (divisor at least 1).

The thresholds and the majority sign are global statistics, so the engine streams the model three
times before merging (two radix-select passes for float32, four for float64, plus one for Σ γ); only one
key's T slices are ever in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.order_statistics import kth_smallest
from lightning_score.merging.registry import KeyMerger, KeyStream, register_method

__all__ = ["TiesMerge", "disjoint_mean", "elect_sign", "threshold_rank", "trim_to_top"]


def threshold_rank(total: int, density: float) -> int:
    """The 1-indexed rank of the trim threshold among P = ``total`` magnitudes: k = P − int(P·density).

    ``int`` truncates the double-precision product as Python computes it. ``density = 1`` would give k = 0
    (an error in the authors' code); it is read as "keep everything" (k = 1).

    Example:
        >>> threshold_rank(10, 0.2), threshold_rank(15, 0.2), threshold_rank(4, 1.0)
        (8, 12, 1)
    """
    return max(total - int(total * density), 1)


def trim_to_top(deltas: Tensor, thresholds: Tensor) -> Tensor:
    """Step 1: zero every entry of task t below its magnitude threshold (``thresholds [T]``)."""
    view = (-1,) + (1,) * (deltas.ndim - 1)
    return torch.where(deltas.abs() >= thresholds.view(view), deltas, torch.zeros_like(deltas))


def elect_sign(trimmed: Tensor, majority_sign: Tensor) -> Tensor:
    """Step 2: the elected sign per entry; zero sums take the model-wide majority sign."""
    sign = torch.sign(trimmed.sum(dim=0))
    return torch.where(sign == 0, majority_sign.to(sign.dtype), sign)


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Step 3: per entry, the mean of the trimmed values that agree with the elected sign."""
    agrees = torch.sign(trimmed) == sign.unsqueeze(0)
    total = (trimmed * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp_min(1)


@register_method(
    "ties",
    reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708",
    scope="all",
)
class TiesMerge(KeyMerger):
    """Keep each task's largest entries, elect a sign per entry, average the entries that agree with it.

    Cost: O(T·P) per pass, three to five streaming passes over the model; memory one key's T slices plus a
    65,536-bin histogram per task.

    Args:
        density: The fraction K of each task's entries kept, over the whole model (0.2, the paper's and the
            SCORE authors' setting); the threshold is the (P − int(P·K))-th smallest magnitude.
    """

    def __init__(self, *, density: float = 0.2) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"ties: density must lie in (0, 1], got {density}.")
        self.density = density

    def threshold_rank(self, total: int) -> int:
        """The 1-indexed rank of each task's trim threshold among its ``total`` magnitudes (:func:`threshold_rank`)."""
        return threshold_rank(total, self.density)

    def prepare(self, stream: KeyStream) -> None:
        """Find each task's magnitude threshold over all keys, then the majority sign."""
        ranks = torch.full((stream.num_tasks, 1), self.threshold_rank(stream.numel()))
        self.thresholds = kth_smallest(lambda: stream.flat(torch.abs), ranks).squeeze(1)
        sign_sum = torch.zeros((), dtype=torch.float64)
        for _, deltas in stream:
            trimmed = trim_to_top(deltas, self.thresholds)
            sign_sum += torch.sign(trimmed.sum(dim=0)).sum().to(device="cpu", dtype=torch.float64)
        self.majority_sign = torch.sign(sign_sum)

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Trim, elect and take the disjoint mean of one key."""
        trimmed = trim_to_top(deltas, self.thresholds.to(deltas.device, deltas.dtype))
        return disjoint_mean(trimmed, elect_sign(trimmed, self.majority_sign.to(deltas.device)))
