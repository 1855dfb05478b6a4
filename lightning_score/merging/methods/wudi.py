"""WUDI-Merging: "Whoever Started the Interference Should End It". Data-free, iterative.

Cheng, Xiong, Wei, Zhu, Yuan. "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", ICML 2025, arXiv:2503.08099 (code: github.com/nathanielyvo/WUDI-Merging).

A linear layer's task vector τ_t ∈ ℝ^{m×n} lies approximately in the span of the inputs that layer saw
while fine-tuning, so τ_t itself stands in for task t's data: the merged update M of each block linear
layer minimises the interference it causes on those proxy inputs,

    L(M) = Σ_t ‖(M − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F,

starting from M₀ = Σ_t τ_t, with ``iterations`` steps of Adam (learning rate ``lr``, β = (0.9, 0.999),
ε = 1e-8, no weight decay), as the authors do. The gradient is written out,
∇L = 2 (M A − B) with A = Σ_t τ_tᵀτ_t / ‖τ_t‖² (n×n) and B = Σ_t τ_t τ_tᵀτ_t / ‖τ_t‖² (m×n), both formed
once per layer, so each step is one m×n×n product (a task with a zero update contributes nothing; the
reference divides by its zero norm and returns NaN).

Reference implementation: nathanielyvo/WUDI-Merging (read at b5f879b; the issue's dc3cd12 ``vit/wudi_main.py``
computes the same), ``wudi_main.py``, ``decompose_task_vectors`` and ``get_redundant_task_vector``: only the
four linear layers of each block are solved, and the merged task vector holds nothing else, so **every other
key keeps θ₀** (a zero update): biases, norms, ``class_embedding``, ``conv1.weight``, ``positional_embedding``
and ``proj``. That is the default (``other_keys="zero"``). ``other_keys="mean"`` gives those keys the mean over
tasks instead, and with ``all_matrices=True`` every matrix key is solved: that is tanganke/fusion_bench's
``wudi_merging`` (read at e41de5a; its config runs 400 iterations). The result is not a small correction of
Task Arithmetic: each entry moves by up to ``iterations · lr`` (3e-3 at the defaults), the size of CLIP
task-vector entries, and on realistic inputs the merge lies about 50 % (relative norm) away from Σ_t τ_t.
Runs on the engine's device, one key at a time.
"""

from __future__ import annotations

import math

from torch import Tensor

from lightning_score.merging.keys import is_block_linear, is_matrix_key
from lightning_score.merging.registry import KeyMerger, register_method

__all__ = ["OTHER_KEYS", "WUDIMerge", "interference_terms", "wudi_layer"]

OTHER_KEYS: tuple[str, ...] = ("zero", "mean")
"""What the keys WUDI does not solve get: no update (the authors') or the mean over tasks."""

_BETAS = (0.9, 0.999)
_EPS = 1e-8


def interference_terms(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """A = Σ_t τ_tᵀτ_t/‖τ_t‖² ``[n, n]`` and B = Σ_t τ_t τ_tᵀτ_t/‖τ_t‖² ``[m, n]`` (zero updates skipped)."""
    grams = deltas.mT @ deltas  # [T, n, n]
    squared_norms = deltas.square().sum(dim=(-2, -1))
    weights = (1.0 / squared_norms).where(squared_norms > 0, squared_norms.new_zeros(()))
    A = (grams * weights[:, None, None]).sum(dim=0)
    B = ((deltas @ grams) * weights[:, None, None]).sum(dim=0)
    return A, B


def wudi_layer(deltas: Tensor, *, iterations: int = 300, lr: float = 1e-5) -> Tensor:
    """Minimise L(M) for one layer's ``[T, m, n]`` task vectors by Adam from M₀ = Σ_t τ_t.

    With one task, M₀ = τ₁ is the minimiser and every gradient is exactly zero: it is returned as is (the
    cancellation in M A − B would otherwise feed rounding noise to Adam, which rescales it to full steps).
    """
    merged = deltas.sum(dim=0)
    if deltas.shape[0] == 1:
        return merged
    A, B = interference_terms(deltas)
    first, second = merged.new_zeros(merged.shape), merged.new_zeros(merged.shape)
    beta1, beta2 = _BETAS
    for step in range(1, iterations + 1):
        gradient = 2 * (merged @ A - B)
        first.mul_(beta1).add_(gradient, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denominator = (second.sqrt() / math.sqrt(bias2)).add_(_EPS)
        merged.addcdiv_(first, denominator, value=-lr / bias1)
    return merged


@register_method(
    "wudi",
    reference="Cheng, Xiong, Wei, Zhu, Yuan, Whoever Started the Interference Should End It: Guiding Data-Free "
    "Model Merging via Task Vectors, ICML 2025, arXiv:2503.08099",
    scope="all",
    choices={"other_keys": OTHER_KEYS},
)
class WUDIMerge(KeyMerger):
    """Per block linear layer, the update that least disturbs every task's own directions (Adam from Σ_t τ_t).

    Defaults: the authors' released ViT code (300 Adam steps at learning rate 1e-5, the other keys left at θ₀;
    see the module docstring); the SCORE authors' code does not run WUDI. Cost per m×n layer: 2T GEMMs to form
    A and B, then one m×n×n GEMM per step; memory O(T·m·n + n²). On a GPU this takes seconds for a ViT-B; on a
    CPU, minutes.

    Args:
        iterations: Adam steps (300, the authors' ``--iter`` default).
        lr: Adam's learning rate (1e-5, the authors' ViT code). It bounds how far M moves from Σ_t τ_t: about
            ``iterations · lr`` per entry.
        all_matrices: Solve every matrix key (``is_matrix_key``), not only the blocks' linear layers
            (FusionBench's rule; False: the authors').
        other_keys: What every key that is not solved gets: ``"zero"`` (default: θ₀, no update, as the authors'
            code) or ``"mean"`` (the mean over tasks, as FusionBench).
    """

    def __init__(
        self, *, iterations: int = 300, lr: float = 1e-5, all_matrices: bool = False, other_keys: str = "zero"
    ) -> None:
        if iterations < 0:
            raise ValueError(f"wudi: iterations must be a non-negative integer, got {iterations}.")
        if not lr > 0.0:
            raise ValueError(f"wudi: lr must be positive, got {lr}.")
        self.iterations, self.lr, self.all_matrices, self.other_keys = iterations, lr, all_matrices, other_keys

    def solves(self, key: str, shape: tuple[int, ...]) -> bool:
        """Whether the key's update is optimised (a block linear layer, or with ``all_matrices`` any matrix)."""
        return is_matrix_key(key, shape) and (self.all_matrices or is_block_linear(key))

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """WUDI on the solved layers; no update (or the mean, ``other_keys="mean"``) on every other key."""
        if not self.solves(key, tuple(deltas.shape[1:])):
            return deltas.mean(dim=0) if self.other_keys == "mean" else deltas.new_zeros(deltas.shape[1:])
        return wudi_layer(deltas, iterations=self.iterations, lr=self.lr)
