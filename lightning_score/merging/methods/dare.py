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
u ≥ p (compared in double precision).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_score.merging.methods.ties import TiesMerge
from lightning_score.merging.registry import KeyMerger, KeyStream, register_method
from lightning_score.merging.seeding import check_seed, uniform_draws

__all__ = ["DareTaskArithmetic", "DareTies", "drop_and_rescale"]

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


def _check_drop_rate(method: str, drop_rate: float) -> float:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{method}: drop_rate must lie in [0, 1), got {drop_rate}.")
    return float(drop_rate)


@register_method("dare_ta", reference=_REFERENCE, scope="all")
class DareTaskArithmetic(KeyMerger):
    """Drop each task-vector entry with probability p, rescale the rest by 1/(1 − p), then sum the tasks.

    Cost: O(T·P) plus T·P uniform draws on the CPU; memory one key's T slices and its draws.

    Args:
        drop_rate: The drop probability p (0.9, the DARE paper's setting; the SCORE authors' code carries
            DARE but its released scripts set no rate).
        seed: Seeds the per-key generators (0).
    """

    def __init__(self, *, drop_rate: float = 0.9, seed: int = 0) -> None:
        self.drop_rate = _check_drop_rate("dare_ta", drop_rate)
        self.seed = check_seed("dare_ta", seed)

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Σ_t of the dropped and rescaled slices."""
        return drop_and_rescale(key, deltas, self.drop_rate, self.seed).sum(dim=0)


@register_method("dare_ties", reference=_REFERENCE + "; then Yadav et al., TIES-Merging, NeurIPS 2023", scope="all")
class DareTies(TiesMerge):
    """Drop and rescale each task vector as DARE does, then merge the sparsified vectors with TIES.

    TIES's global statistics are taken over the sparsified vectors: each pass over the model redraws the same
    masks from the per-key generators. Cost: TIES's passes, each with T·P uniform draws.

    Args:
        drop_rate: The drop probability p (0.9, the DARE paper's setting).
        density: TIES's kept fraction K (0.2, as ``ties``).
        seed: Seeds the per-key generators (0).
    """

    def __init__(self, *, drop_rate: float = 0.9, density: float = 0.2, seed: int = 0) -> None:
        super().__init__(density=density)
        self.drop_rate = _check_drop_rate("dare_ties", drop_rate)
        self.seed = check_seed("dare_ties", seed)

    def _drop(self, key: str, deltas: Tensor) -> Tensor:
        return drop_and_rescale(key, deltas, self.drop_rate, self.seed)

    def prepare(self, stream: KeyStream) -> None:
        """TIES's thresholds and majority sign over the dropped-and-rescaled model."""
        super().prepare(stream.map(self._drop))

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """TIES on the dropped-and-rescaled slices of one key."""
        return super().merge_key(key, self._drop(key, deltas))
