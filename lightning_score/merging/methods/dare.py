"""DARE: Drop And REscale, then Task Arithmetic (``dare_ta``) or TIES (``dare_ties``).

Yu, Yu, Yu, Huang, Li. "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, arXiv:2311.03099. Data-free, seeded.

Every entry of every task vector is dropped with probability p and the survivors are rescaled by
1/(1 − p), so that each entry keeps its expectation: τ̂_t = (m_t ⊙ τ_t)/(1 − p), m_t ~ Bernoulli(1 − p)
entrywise, over every key (weights, biases, norms alike, as the paper and the SCORE authors' code do). The
sparsified vectors are then merged by Task Arithmetic (Σ_t τ̂_t) or by TIES.

The drop mask of a key is drawn from a generator seeded by (``seed``, key name), on the CPU in float32
(:mod:`~lightning_score.merging.seeding`): a merge is reproducible bit for bit, whatever the key order, the
compute device, or how the keys are split across processes. Entry i of task t is kept when its uniform draw
u ≥ p (compared in double precision). Task t's mask is slice t of the key's draws, so the first tasks' masks
do not change when more tasks are merged (as in the reference, where a task's mask follows its position).

Reference implementation: yule-BUAA/MergeLM (read at 0dbd199), ``model_merging_methods/mask_weights_utils.py``
(``mask_input_with_mask_rate``: the drop and the 1/(1 − p) rescale) and ``merging_methods.py``
(``MergingMethod.merging_models`` with ``mask_apply_method="task_arithmetic"``, ``scaling_coefficient=1.0``, for
``dare_ta``; ``ties_merging`` with ``mask_smallest_magnitude_param_values`` for ``dare_ties``). Its masks come
from one global torch stream reseeded to 0 before each merge, ours from one generator per key: the same
Bernoulli(p) masks in distribution, not the same bits. ``drop_rate=0.9`` is the DARE paper's setting and the
top of MergeLM's GLUE search grid; MergeLM's argparse default is 0.1 (with rescaling off), its README's merge
examples use 0.1 and 0.2 with rescaling, and 0.9 appears there for sparsifying one model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.methods.ties import TiesMerge, threshold_rank
from lightning_score.merging.registry import KeyMerger, KeyStream, register_method
from lightning_score.merging.seeding import check_seed, uniform_draws

__all__ = [
    "THRESHOLDS",
    "DareTaskArithmetic",
    "DareTies",
    "check_drop_rate",
    "drop_and_rescale",
    "mergelm_threshold_rank",
]

THRESHOLDS: tuple[str, ...] = ("mergelm", "ties")
"""How ``dare_ties`` ranks its trim threshold: MergeLM's rule (the default) or the SCORE authors' TIES rule."""

_REFERENCE = (
    "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
    "ICML 2024, arXiv:2311.03099"
)


def drop_and_rescale(key: str, deltas: Tensor, drop_rate: float, seed: int) -> Tensor:
    """DARE on one key's T slices: zero each entry with probability ``drop_rate``, divide the rest by 1 − p."""
    if drop_rate == 0.0:
        return deltas
    keep = uniform_draws(seed, key, tuple(deltas.shape), deltas.device).double() >= drop_rate
    return torch.where(keep, deltas / (1.0 - drop_rate), torch.zeros_like(deltas))


def mergelm_threshold_rank(total: int, density: float) -> int:
    """MergeLM's trim threshold rank: k = int(P·m) with the mask rate m = 1 − density (0.8), at least 1.

    MergeLM keeps the entries with |x| ≥ the k-th smallest magnitude (``torch.kthvalue``); the mask rate is the
    decimal a user passes (1 − 0.2 = 0.8, rounded to 12 digits so that 1 − 0.6 reads 0.4). Where 0.2·P is not
    an integer this keeps one entry more than TIES's k = P − int(P·0.2).

    Example:
        >>> mergelm_threshold_rank(10, 0.2), mergelm_threshold_rank(7, 0.2), mergelm_threshold_rank(2, 1.0)
        (8, 5, 1)
    """
    return max(int(total * round(1.0 - density, 12)), 1)


def check_drop_rate(method: str, drop_rate: float) -> float:
    """Return the drop probability p as a float if it lies in [0, 1); raise a ValueError naming the method otherwise."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{method}: drop_rate must lie in [0, 1), got {drop_rate}.")
    return float(drop_rate)


@register_method("dare_ta", reference=_REFERENCE, scope="all")
class DareTaskArithmetic(KeyMerger):
    """Drop each task-vector entry with probability p, rescale the rest by 1/(1 − p), then sum the tasks.

    Cost: O(T·P) plus T·P uniform draws on the CPU; memory one key's T slices and its draws.

    MergeLM's ``mask_merging`` with ``mask_apply_method="task_arithmetic"`` and ``scaling_coefficient=1.0`` (its
    default ``average_merging`` is Σ_t τ̂_t / T: ``dare_ta`` at α = 1/T). The SCORE authors' stored scripts send
    ``dare_ta`` to a plain sum without any drop.

    Args:
        drop_rate: The drop probability p (0.9: the DARE paper's setting; see the module docstring for
            MergeLM's values).
        seed: Seeds the per-key generators (0, as MergeLM seeds its stream).
    """

    def __init__(self, *, drop_rate: float = 0.9, seed: int = 0) -> None:
        self.drop_rate = check_drop_rate("dare_ta", drop_rate)
        self.seed = check_seed("dare_ta", seed)

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Σ_t of the dropped and rescaled slices."""
        return drop_and_rescale(key, deltas, self.drop_rate, self.seed).sum(dim=0)


@register_method(
    "dare_ties",
    reference=_REFERENCE + "; then Yadav et al., TIES-Merging, NeurIPS 2023",
    scope="all",
    choices={"threshold": THRESHOLDS},
)
class DareTies(TiesMerge):
    """Drop and rescale each task vector as DARE does, then merge the sparsified vectors with TIES.

    TIES's global statistics are taken over the sparsified vectors: each pass over the model redraws the same
    masks from the per-key generators. Cost: TIES's passes, each with T·P uniform draws.

    Args:
        drop_rate: The drop probability p (0.9: the DARE paper's setting; see the module docstring).
        density: TIES's kept fraction K (0.2: MergeLM's ``param_value_mask_rate`` 0.8).
        seed: Seeds the per-key generators (0).
        threshold: ``"mergelm"`` (default: MergeLM's ``ties_merging``, the threshold is the int(P·(1 − K))-th
            smallest magnitude) or ``"ties"`` (the SCORE authors' TIES rule of ``ties``, the
            (P − int(P·K))-th); they differ by one entry per task where K·P is not an integer.
    """

    def __init__(
        self, *, drop_rate: float = 0.9, density: float = 0.2, seed: int = 0, threshold: str = "mergelm"
    ) -> None:
        super().__init__(density=density)
        self.drop_rate = check_drop_rate("dare_ties", drop_rate)
        self.seed = check_seed("dare_ties", seed)
        self.threshold = threshold

    def threshold_rank(self, total: int) -> int:
        """MergeLM's rank (:func:`mergelm_threshold_rank`) or, with ``threshold="ties"``, TIES's."""
        if self.threshold == "ties":
            return threshold_rank(total, self.density)
        return mergelm_threshold_rank(total, self.density)

    def _drop(self, key: str, deltas: Tensor) -> Tensor:
        return drop_and_rescale(key, deltas, self.drop_rate, self.seed)

    def prepare(self, stream: KeyStream) -> None:
        """TIES's thresholds and majority sign over the dropped-and-rescaled model."""
        super().prepare(stream.map(self._drop))

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """TIES on the dropped-and-rescaled slices of one key."""
        return super().merge_key(key, self._drop(key, deltas))
