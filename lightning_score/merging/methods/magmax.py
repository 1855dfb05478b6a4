"""MagMax: per entry, keep the task update of largest magnitude.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024, arXiv:2407.06322. Data-free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import register_method

__all__ = ["magmax_merge"]


@register_method(
    "magmax",
    reference="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024, "
    "arXiv:2407.06322",
    scope="all",
)
def magmax_merge(deltas: Tensor) -> Tensor:
    """For every entry, the value of the task whose update there is largest in magnitude.

    Ties go to the later task. No options. Cost: O(T·P) comparisons; memory one key's T slices.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.

    Returns:
        The selected entries, shaped like one slice.
    """
    num_tasks = deltas.shape[0]
    # argmax returns the first maximum; searching the tasks in reverse makes ties go to the later task
    winner = num_tasks - 1 - deltas.abs().flip(0).argmax(dim=0, keepdim=True)
    return torch.gather(deltas, 0, winner).squeeze(0)
