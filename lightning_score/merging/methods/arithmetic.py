"""Task Arithmetic and weight averaging: the elementwise baselines.

* Task Arithmetic (Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi. "Editing Models
  with Task Arithmetic", ICLR 2023, arXiv:2212.04089): Δ* = Σ_t τ_t. At α = 1 this is a plain sum, which
  over-shoots for several tasks (the protocol evaluates every method at α = 1 all the same).
* Averaging (Wortsman et al. "Model soups", ICML 2022): Δ* = (1/T) Σ_t τ_t.
"""

from __future__ import annotations

from torch import Tensor

from lightning_score.merging.registry import register_method

__all__ = ["average_merge", "task_arithmetic_merge"]


@register_method(
    "task_arithmetic",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089",
    scope="all",
)
def task_arithmetic_merge(deltas: Tensor) -> Tensor:
    """Sum the task vectors, every key (scale them with ``alpha``).

    No options. Cost: O(T·P) additions; memory one key's T slices.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.

    Returns:
        Σ_t τ_t for that key.
    """
    return deltas.sum(dim=0)


@register_method(
    "average",
    reference="Wortsman et al., Model soups: averaging weights of multiple fine-tuned models, ICML 2022, "
    "arXiv:2203.05482",
    scope="all",
)
def average_merge(deltas: Tensor) -> Tensor:
    """Average the task vectors, every key.

    No options. Cost: O(T·P) additions; memory one key's T slices.

    Args:
        deltas: ``[T, ...]`` the T slices of one key.

    Returns:
        (1/T) Σ_t τ_t for that key.
    """
    return deltas.mean(dim=0)
