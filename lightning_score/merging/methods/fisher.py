"""Fisher merging: a per-entry average weighted by each expert's diagonal Fisher information. Data-using.

Matena, Raffel. "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv:2111.09832.

With F_t the diagonal of expert t's Fisher information (one non-negative number per parameter entry) and
model weights λ_t, the merge maximises the weighted sum of the experts' Laplace-approximated posteriors:
θ* = Σ_t λ_t F̃_t θ_t / Σ_t λ_t F̃_t, entry by entry. Writing θ_t = θ₀ + τ_t, the pre-trained weights drop out:

    Δ* = Σ_t λ_t F̃_t ⊙ τ_t / Σ_t λ_t F̃_t.

Reference implementation: mmatena/model_merging (read at f2d1677; its README at the issue's 46802f9),
``model_merging/merging.py``, ``_merge_with_coeffs`` and ``_l2_norm_of_fisher``, at its defaults
(``normalize_fishers=True``, ``favor_target_model=True``, ``fisher_floor=1e-6``):

* ``normalize_fishers``: each model's weight is divided by the L2 norm of its whole Fisher,
  λ_t = (1/T) / ‖F_t‖ (over every key given a Fisher), so a model whose Fisher is large overall does not win
  every entry;
* ``favor_first_model`` (the reference's ``favor_target_model``): only the FIRST model's Fisher is floored,
  F̃_0 = max(F_0, floor), the others' are used as they are, so an entry where every other Fisher is exactly 0
  gets the first model's value; without it every model is floored and such an entry gets the weighted mean.

The weights λ_t: the reference searches them on the target task's evaluation data, which a leave-one-domain-out
protocol forbids; equal weights λ_t = 1/T are this package's choice. "The first model" is, in the reference,
the target task's own model; a leave-one-domain-out merge has none, so it is the first task vector in the
order given: the study merges the sources in the dataset's domain order (the order its result files record
under ``sources``), so the first source domain's expert is floored. ``normalize_fishers=False,
favor_first_model=False`` is what this package computed before: every Fisher floored, the plain
Fisher-weighted mean. Keys without Fisher tensors get the mean over tasks; a model whose whole Fisher is 0 keeps
λ_t = 1/T (the reference would divide by 0).

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

__all__ = ["FisherMerge", "fisher_coefficients", "fisher_weighted_mean"]


def fisher_coefficients(fishers: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> Tensor:
    """λ_t = (1/T) / ‖F_t‖ in float64, ‖F_t‖ the L2 norm of task t's Fisher over ``keys`` (1/T where it is 0).

    Example:
        >>> fishers = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}]
        >>> fisher_coefficients(fishers, ["w"]).tolist()
        [0.1, 0.5]
    """
    squares = [sum(float(mapping[key].double().square().sum()) for key in keys) for mapping in fishers]
    norms = torch.tensor(squares, dtype=torch.float64).sqrt()
    equal = 1.0 / len(fishers)
    return torch.where(norms > 0, equal / norms.clamp_min(torch.finfo(torch.float64).tiny), equal)


def fisher_weighted_mean(
    deltas: Tensor,
    fishers: Tensor,
    fisher_floor: float = 1e-6,
    coefficients: Tensor | None = None,
    favor_first_model: bool = False,
) -> Tensor:
    """Σ_t λ_t F̃_t ⊙ τ_t / Σ_t λ_t F̃_t for one key: ``deltas`` and ``fishers`` both ``[T, *shape]``.

    Args:
        deltas: The T slices of one key.
        fishers: Their diagonal Fishers.
        fisher_floor: The floor of F̃ (of the first model's only, with ``favor_first_model``).
        coefficients: λ ``[T]`` (default: equal, which cancel).
        favor_first_model: Floor only the first model's Fisher.

    Example:
        >>> deltas = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
        >>> fishers = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
        >>> fisher_weighted_mean(deltas, fishers).tolist()  # the second entry: both floored, the plain mean
        [-0.5, 0.0]
        >>> fisher_weighted_mean(deltas, fishers, favor_first_model=True).tolist()  # the first model's value
        [-0.5, 1.0]
    """
    if favor_first_model:
        weights = torch.cat([fishers[:1].clamp_min(fisher_floor), fishers[1:]])
    else:
        weights = fishers.clamp_min(fisher_floor)
    if coefficients is not None:
        weights = weights * coefficients.to(weights.dtype).view((-1,) + (1,) * (weights.ndim - 1))
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
        fisher_floor: Lower bound on the floored Fisher entries (1e-6, the reference's).
        normalize_fishers: Divide each task's weight by the L2 norm of its whole Fisher (True, the reference's).
        favor_first_model: Floor only the first task's Fisher (True, the reference's ``favor_target_model``);
            False floors every task's.
    """

    def __init__(
        self,
        *,
        fishers: Sequence[Mapping[str, Tensor]] | None = None,
        fisher_floor: float = 1e-6,
        normalize_fishers: bool = True,
        favor_first_model: bool = True,
    ) -> None:
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
        self.normalize_fishers = normalize_fishers
        self.favor_first_model = favor_first_model
        self.targets = set(self.fishers[0]) if self.fishers else set()
        self.coefficients: Tensor | None = None

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
        if self.normalize_fishers:
            self.coefficients = fisher_coefficients(self.fishers, sorted(self.targets))

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """The Fisher-weighted mean where Fisher tensors are given, the plain mean elsewhere."""
        if key not in self.targets:
            return deltas.mean(dim=0)
        fishers = torch.stack([mapping[key].to(device=deltas.device, dtype=deltas.dtype) for mapping in self.fishers])
        coefficients = self.coefficients.to(deltas.device) if self.coefficients is not None else None
        return fisher_weighted_mean(deltas, fishers, self.fisher_floor, coefficients, self.favor_first_model)
