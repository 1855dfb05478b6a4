"""PCB-Merging: Parameter Competition Balancing.

Du, Lee, Li, Jiang, Chen, Li, Hu, Wang, Tan, Wang, Tang, Chen. "Parameter Competition Balancing for Model
Merging", NeurIPS 2024, arXiv:2410.02396. Data-free.

On the flattened T×P matrix of the whole model:

1. Clip |τ_t| to [s[int(P·0.01)], s[int(P·0.99 − 1)]] (keeping the sign), s being that task's P
   magnitudes sorted ascending, 0-indexed.
2. Normalise |clipped| to [0, 1] per task (min-max): a_t; ν_t = sign(τ_t)·a_t.
3. Intra-balancing exp(T·a_t²), inter-balancing Σ_j tanh(ν_t ⊙ ν_j) (j = t included); β_t their product.
4. Drop: clamp β_t below at s_β[int(P·0.95)] (its own values sorted ascending; drop ratio 0.05), min-max
   normalise → w_t.
5. Δ* = Σ_t clipped τ_t ⊙ w_t / max(Σ_t w_t, 1e-12).

The indices are those of the authors' released code (products in double precision, ``int`` truncating,
as Python computes them); the order statistics are exact
(:func:`~lightning_score.merging.order_statistics.kth_smallest`), computed by streaming the model key by key.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_score.merging.order_statistics import kth_smallest
from lightning_score.merging.registry import KeyMerger, KeyStream, register_method

__all__ = ["PCBMerge", "balance", "clip_and_normalise", "clip_ranks", "floor_rank"]


def clip_ranks(total: int, clip: float) -> tuple[int, int]:
    """1-indexed ranks of the clip bounds among P = ``total`` magnitudes: s[int(P·c)] and s[int(P·(1 − c) − 1)].

    Example:
        >>> clip_ranks(100, 0.01), clip_ranks(150, 0.01), clip_ranks(1, 0.01)
        ((2, 99), (2, 148), (1, 1))
    """
    return int(total * clip) + 1, int(total * (1 - clip) - 1) + 1


def floor_rank(total: int, ratio: float) -> int:
    """1-indexed rank of the balance-score floor among P scores: s_β[int(P·(1 − ratio))].

    Example:
        >>> floor_rank(100, 0.05), floor_rank(7, 0.05)
        (96, 7)
    """
    return int(total * (1 - ratio)) + 1


def _per_task(values: Tensor, like: Tensor) -> Tensor:
    return values.view((-1,) + (1,) * (like.ndim - 1))


def clip_and_normalise(deltas: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 1-2: the clipped task vectors and a_t, |τ_t| clamped into [low_t, high_t] and min-max normalised.

    The clamped magnitudes range exactly over [low_t, high_t] (both are entries of the task), so those are
    the min and max of the normalisation. A task whose clamped magnitudes are all equal gets a_t = 0.
    """
    low, high = _per_task(low, deltas), _per_task(high, deltas)
    magnitudes = deltas.abs().clamp(min=low, max=high)
    span = high - low
    normalised = torch.where(span > 0, (magnitudes - low) / span.clamp_min(torch.finfo(span.dtype).tiny), 0.0)
    return torch.sign(deltas) * magnitudes, normalised


def balance(deltas: Tensor, normalised: Tensor) -> Tensor:
    """Step 3: β_t = exp(T·a_t²) ⊙ Σ_j tanh(ν_t ⊙ ν_j) with ν_t = sign(τ_t)·a_t."""
    num_tasks = deltas.shape[0]
    nu = torch.sign(deltas) * normalised
    inter = torch.zeros_like(nu)
    for j in range(num_tasks):  # a loop, not a [T, T, ...] tensor: memory stays O(T·n)
        inter += torch.tanh(nu * nu[j])
    return torch.exp(num_tasks * normalised.square()) * inter


@register_method(
    "pcb",
    reference="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024, arXiv:2410.02396",
    scope="all",
)
class PCBMerge(KeyMerger):
    """Weight every entry by how much it matters within its task and agrees across tasks, drop the weakest.

    Cost: O(T²·P) for the inter-task balance, five to nine streaming passes over the model (order statistics
    of |τ| and of β, then the merge); memory one key's T slices (T² for the balance) plus small histograms.

    Args:
        ratio: The fraction of each task's balance scores kept above the clamp (0.05: the floor is
            s_β[int(P·0.95)], the paper's and the SCORE authors' setting).
        clip: The fraction clipped at each end of each task's magnitudes (0.01: s[int(P·0.01)] and
            s[int(P·0.99 − 1)], as the authors' code).
    """

    def __init__(self, *, ratio: float = 0.05, clip: float = 0.01) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"pcb: ratio must lie in (0, 1], got {ratio}.")
        if not 0.0 <= clip < 0.5:
            raise ValueError(f"pcb: clip must lie in [0, 0.5), got {clip}.")
        self.ratio, self.clip = ratio, clip

    def prepare(self, stream: KeyStream) -> None:
        """Order statistics of every task's magnitudes, then of its balance scores, over the whole model."""
        total, num_tasks = stream.numel(), stream.num_tasks
        ranks = torch.tensor([clip_ranks(total, self.clip)] * num_tasks)
        bounds = kth_smallest(lambda: stream.flat(torch.abs), ranks)
        self.low, self.high = bounds[:, 0], bounds[:, 1]

        def scores() -> Iterator[Tensor]:
            return stream.flat(lambda deltas: balance(deltas, clip_and_normalise(deltas, self.low, self.high)[1]))

        floor_and_max = kth_smallest(scores, torch.tensor([[floor_rank(total, self.ratio), total]] * num_tasks))
        self.floor, self.ceiling = floor_and_max[:, 0], floor_and_max[:, 1]

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Clip, balance, drop and take the weighted mean of one key."""
        clipped, normalised = clip_and_normalise(deltas, self.low.to(deltas.device), self.high.to(deltas.device))
        beta = balance(deltas, normalised)
        floor, ceiling = _per_task(self.floor.to(deltas.device), beta), _per_task(self.ceiling.to(deltas.device), beta)
        span = ceiling - floor
        weights = torch.where(
            span > 0, (beta.clamp(min=floor) - floor) / span.clamp_min(torch.finfo(span.dtype).tiny), 0
        )
        return (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)
