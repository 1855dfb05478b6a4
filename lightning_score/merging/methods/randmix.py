"""RandMix: per entry, the value of one task chosen uniformly at random. Data-free, seeded.

The random-mixing baseline of Marczak, Twardowski, Trzciński, Cygert, "MagMax: Leveraging Model Merging for
Seamless Continual Learning", ECCV 2024, arXiv:2407.06322, which the SCORE authors also run (Chaves et al.,
CVPR 2026, arXiv:2603.05768): for every entry of every key, draw a task index
uniformly from {0, …, T − 1} and take that task's value. The indices of a key come from a generator seeded
by (``seed``, key name) on the CPU (:mod:`~lightning_score.merging.seeding`), so a merge is reproducible
bit for bit whatever the key order, the device or the split of keys across processes.

Reference implementation: VirtualSpaceman/score_cvpr26@a75ee36, ``src/merging/task_vectors.py``,
``merge_rnd_mix``: the same rule, with its indices drawn by ``torch.randint(0, T, shape)`` from one global
stream (seeded 5), so its draws depend on the key order and no seed here reproduces them bit for bit (the same
distribution). The draws for a key depend on T (an index in {0, …, T − 1} per entry).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.registry import KeyMerger, register_method
from lightning_score.merging.seeding import check_seed, uniform_choices

__all__ = ["RandMix"]


@register_method(
    "randmix",
    reference="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning (RandMix baseline), "
    "ECCV 2024, arXiv:2407.06322",
    scope="all",
)
class RandMix(KeyMerger):
    """For every entry, the value of a task drawn uniformly at random.

    Cost: O(T·P) plus P integer draws on the CPU; memory one key's T slices.

    Args:
        seed: Seeds the per-key generators (0; the SCORE authors draw from one global stream seeded with 5,
            whose draws depend on the key order, so no seed reproduces theirs).
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = check_seed("randmix", seed)

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Pick, entry by entry, the slice of a random task."""
        choice = uniform_choices(self.seed, key, deltas.shape[0], tuple(deltas.shape[1:]), deltas.device)
        return torch.gather(deltas, 0, choice.unsqueeze(0)).squeeze(0)
