"""Fisher merging: a per-entry average weighted by each expert's diagonal Fisher information. Data-using.

Matena, Raffel. "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv:2111.09832.

With F_t the diagonal of expert t's Fisher information (one non-negative number per parameter entry),
the merge maximises the sum of the experts' Laplace-approximated posteriors: θ* = Σ_t F_t θ_t / Σ_t F_t,
entry by entry (equal model weights λ_t = 1/T, which cancel). Writing θ_t = θ₀ + τ_t, the pre-trained
weights drop out:

    Δ* = Σ_t F̃_t ⊙ τ_t / Σ_t F̃_t,   F̃_t = max(F_t, ``fisher_floor``),

the floor (the paper's implementation uses 1e-6) keeping entries where every Fisher vanishes defined
(there the merge is the plain mean). Keys without Fisher tensors get the mean over tasks.

The statistics come as one option (the core never runs a model)::

    fishers = [  # one mapping per task, in the task vectors' order
        {"transformer.resblocks.0.attn.in_proj_weight": F_0,  # same shape as the key, >= 0
         ...},
        ...,
    ]

F_t[i] = E_x E_{y ~ p_θt(y|x)} (∂ log p_θt(y|x) / ∂θ_i)², the mean over a few batches of unlabelled images
of expert t's own (source) domain of the squared gradients of the log-likelihood under the expert's own
predictive distribution (the paper's Fisher; the "empirical" Fisher uses the true labels instead). Every
task covers the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_score.merging.registry import KeyMerger, KeyStream, register_method

__all__ = ["FisherMerge", "fisher_weighted_mean"]


def fisher_weighted_mean(deltas: Tensor, fishers: Tensor, fisher_floor: float = 1e-6) -> Tensor:
    """Σ_t F̃_t ⊙ τ_t / Σ_t F̃_t for one key: ``deltas`` and ``fishers`` both ``[T, *shape]``."""
    weights = fishers.clamp_min(fisher_floor)
    return (weights * deltas).sum(dim=0) / weights.sum(dim=0)


@register_method(
    "fisher",
    reference="Matena, Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022, arXiv:2111.09832",
    scope="all",
    needs_data=True,
)
class FisherMerge(KeyMerger):
    """Average each entry over the experts, weighted by how much each expert's likelihood depends on it.

    Cost: O(T·P); memory one key's T slices and their Fisher tensors. Needs each expert's diagonal Fisher on
    a few batches of its own source domain, supplied as ``fishers`` (see the module docstring).

    Args:
        fishers: One mapping per task, key → diagonal Fisher tensor of the key's shape. Required.
        fisher_floor: Lower bound on every Fisher entry (1e-6, as the paper's implementation).
    """

    def __init__(self, *, fishers: Sequence[Mapping[str, Tensor]] | None = None, fisher_floor: float = 1e-6) -> None:
        if fishers is None:
            raise ValueError(
                "Merge method 'fisher' needs data: pass fishers=[{key: diagonal Fisher of that key}, ...], one "
                "mapping per task, computed on a few unlabelled images of that task's (source) domain."
            )
        if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence):
            raise ValueError("fisher: fishers must be a list with one mapping (key -> Fisher tensor) per task.")
        if not fisher_floor > 0.0:
            raise ValueError(f"fisher: fisher_floor must be positive, got {fisher_floor}.")
        self.fishers = list(fishers)
        self.fisher_floor = fisher_floor
        self.targets = set(self.fishers[0]) if self.fishers else set()

    def prepare(self, stream: KeyStream) -> None:
        """Check the Fisher tensors against the task vectors before any work."""
        if len(self.fishers) != stream.num_tasks:
            raise ValueError(
                f"fisher: got fishers for {len(self.fishers)} task(s) but {stream.num_tasks} task vectors; give one "
                "mapping per task, in the same order."
            )
        for index, mapping in enumerate(self.fishers):
            if set(mapping) != self.targets:
                raise ValueError(f"fisher: the fishers of task {index} cover other keys than those of task 0.")
        for key in sorted(self.targets):
            if key not in stream.shapes:
                raise ValueError(
                    f"fisher: a Fisher tensor is given for '{key}', which is not a key of the task vectors."
                )
            for index, mapping in enumerate(self.fishers):
                fisher = mapping[key]
                if tuple(fisher.shape) != stream.shapes[key]:
                    raise ValueError(
                        f"fisher: the Fisher tensor of '{key}' for task {index} has shape {tuple(fisher.shape)}; "
                        f"expected the key's shape {stream.shapes[key]}."
                    )
                if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
                    raise ValueError(
                        f"fisher: the Fisher tensor of '{key}' for task {index} has negative, NaN or inf entries."
                    )

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """The Fisher-weighted mean where Fisher tensors are given, the plain mean elsewhere."""
        if key not in self.targets:
            return deltas.mean(dim=0)
        fishers = torch.stack([mapping[key].to(device=deltas.device, dtype=deltas.dtype) for mapping in self.fishers])
        return fisher_weighted_mean(deltas, fishers, self.fisher_floor)
