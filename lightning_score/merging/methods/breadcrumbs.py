"""Model Breadcrumbs: mask each row's outliers and negligible entries, then sum. Data-free.

Davari, Belilovsky. "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024,
arXiv:2312.06795 (code: github.com/rezazzr/breadcrumbs).

Per task and per row of each key (along its last dimension, n entries), rank the entries of |τ_t| from the
largest down. The largest int(n·``drop_top``) entries are outliers and are masked; of the rest, the next
int(n·``keep``) are kept and everything smaller is masked as negligible. A 1-D key is one row; a 0-d key is
left as it is. The masked task vectors are summed (Task Arithmetic): Δ* = Σ_t mask_t ⊙ τ_t. Equal
magnitudes are ranked by position (a stable sort), so the masks are deterministic.

Reference implementation: rezazzr/breadcrumbs (read at 4a183d6; the issue's f89fc66 computes the same),
``src/task_vectors.py``, ``TaskVectorMiddleKeep`` (``mask_remove_top`` then ``mask_keep_top``, per row along
the last dimension); the SCORE authors' copy (VirtualSpaceman/score_cvpr26@a75ee36,
``src/merging/breadcumbs.py``) computes the same. ``granularity="row"`` (the default) is that rule;
``"layer"`` ranks the whole key at once, as the paper's text describes it, which no released code computes.
The one difference left on purpose: among equal non-zero magnitudes at a boundary, the reference's
``torch.topk`` picks in its own order, ours the lowest positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import register_method

__all__ = ["breadcrumbs_mask", "breadcrumbs_merge"]

GRANULARITIES: tuple[str, ...] = ("layer", "row")


def breadcrumbs_mask(deltas: Tensor, keep: float, drop_top: float, granularity: str = "row") -> Tensor:
    """Boolean ``[T, *shape]`` mask: per task and row (or layer), the entries ranked after the outliers.

    Args:
        deltas: ``[T, *shape]`` the T slices of one key.
        keep: Fraction of the n entries kept (after the outliers).
        drop_top: Fraction of the n entries removed from the top as outliers.
        granularity: ``"row"`` (each row along the last dimension) or ``"layer"`` (the whole key).
    """
    num_tasks = deltas.shape[0]
    if granularity == "row" and deltas.ndim == 1:  # a 0-d key has no row: the authors' code leaves it as is
        return torch.ones_like(deltas, dtype=torch.bool)
    groups = deltas.reshape(num_tasks, -1) if granularity == "layer" else deltas.reshape(-1, deltas.shape[-1])
    n = groups.shape[1]
    removed, kept = int(n * drop_top), int(n * keep)
    order = groups.abs().argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=deltas.device).expand_as(order))
    return ((ranks >= removed) & (ranks < removed + kept)).reshape(deltas.shape)


@register_method(
    "breadcrumbs",
    reference="Davari, Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
    "ECCV 2024, arXiv:2312.06795",
    scope="all",
    choices={"granularity": GRANULARITIES},
)
def breadcrumbs_merge(
    deltas: Tensor, *, keep: float = 0.15, drop_top: float = 0.006, granularity: str = "row"
) -> Tensor:
    """Mask each task's largest (outliers) and smallest (negligible) entries per row, then sum the tasks.

    Defaults: keep 15 % after removing the top 0.6 % (β = 0.15, γ = 0.006: the starting point listed in the
    authors' ``find_best_hyperparam.py``; their class defaults 0, 0 keep nothing, and the SCORE authors' stored
    scripts send ``breadcrumbs`` to a plain sum). Cost: a sort of each task's |τ| per row, O(T·P log n); memory
    one key's T slices and their ranks.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.
        keep: Fraction of each row's entries kept, counted after the outliers (0.15).
        drop_top: Fraction of each row's largest entries masked as outliers (0.006).
        granularity: ``"row"`` (default: the authors' code) or ``"layer"`` (the paper's text).

    Returns:
        Σ_t mask_t ⊙ τ_t for that key.
    """
    if not 0.0 <= drop_top < 1.0:
        raise ValueError(f"breadcrumbs: drop_top must lie in [0, 1), got {drop_top}.")
    if not 0.0 < keep <= 1.0 or keep + drop_top > 1.0:
        raise ValueError(f"breadcrumbs: keep must lie in (0, 1 − drop_top], got keep={keep}, drop_top={drop_top}.")
    mask = breadcrumbs_mask(deltas, keep, drop_top, granularity)
    return torch.where(mask, deltas, torch.zeros_like(deltas)).sum(dim=0)
