"""Low-rank updates Δ = s·B·A, the form a LoRA expert's weight update takes, kept as their factors.

Notation: B ∈ ℝ^{m×ρ}, A ∈ ℝ^{ρ×n}, a scale s (PEFT's ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA),
ρ ≪ min(m, n). A :class:`LowRankUpdate` costs (m + n)·ρ numbers instead of m·n; sums and multiples of updates
stay in factor form (:func:`add_updates`, :meth:`LowRankUpdate.scaled`), and the dense m×n update is built only
when :meth:`LowRankUpdate.dense` is asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LowRankUpdate", "add_updates"]


@dataclass(frozen=True)
class LowRankUpdate:
    """One key's update as factors: Δ = ``scale`` · ``B`` @ ``A``, a weight of ``dtype`` when made dense.

    Attributes:
        B: ``[m, ρ]``.
        A: ``[ρ, n]``.
        scale: The scalar s.
        dtype: The dtype of the weight the update applies to, and of :meth:`dense` (default the factors' common
            dtype). A LoRA expert trained in ``bf16-true`` has bfloat16 factors of a bfloat16 weight.

    Example:
        >>> import torch
        >>> update = LowRankUpdate(torch.ones(3, 1), torch.ones(1, 2), scale=0.5)
        >>> update.shape, update.rank
        ((3, 2), 1)
        >>> update.dense()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000],
                [0.5000, 0.5000]])
        >>> update.scaled(-2.0).dense()[0, 0].item()
        -1.0
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0
    dtype: torch.dtype = field(default=None)  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"A low-rank update needs B [m, ρ] and A [ρ, n] with the same ρ; got B {tuple(self.B.shape)} "
                f"and A {tuple(self.A.shape)}."
            )
        if not (self.B.is_floating_point() and self.A.is_floating_point()):
            raise ValueError(f"A low-rank update's factors are floating point; got {self.B.dtype} and {self.A.dtype}.")
        if self.dtype is None:
            object.__setattr__(self, "dtype", torch.promote_types(self.B.dtype, self.A.dtype))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``, the dense update's shape."""
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        """ρ, the factors' inner dimension (an upper bound of the update's rank)."""
        return self.B.shape[1]

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The update s·B·A as one ``[m, n]`` tensor on CPU, computed in float64 and stored in ``dtype``.

        Args:
            dtype: The result's dtype (default :attr:`dtype`).
        """
        B, A = self.B.detach().to("cpu", torch.float64), self.A.detach().to("cpu", torch.float64)
        return ((B @ A) * self.scale).to(dtype or self.dtype)

    def scaled(self, factor: float) -> LowRankUpdate:
        """The update times a scalar, still as factors (the scale changes; B and A are shared, not copied)."""
        return LowRankUpdate(self.B, self.A, self.scale * float(factor), self.dtype)


def add_updates(first: LowRankUpdate, second: LowRankUpdate, sign: float = 1.0) -> LowRankUpdate:
    """First + sign·second as factors of rank ρ₁ + ρ₂: s₁B₁A₁ + s₂B₂A₂ = [s₁B₁ | s₂B₂] [A₁; A₂].

    The scales are kept as they are when they are equal (s·[B₁ | ±B₂] [A₁; A₂]) and folded into B otherwise.

    Example:
        >>> import torch
        >>> a = LowRankUpdate(torch.randn(4, 1), torch.randn(1, 3), 2.0)
        >>> b = LowRankUpdate(torch.randn(4, 2), torch.randn(2, 3), 0.5)
        >>> total = add_updates(a, b, sign=-1.0)
        >>> total.rank, bool(torch.allclose(total.dense(), a.dense() - b.dense(), atol=1e-6))
        (3, True)
    """
    if first.shape != second.shape:
        raise ValueError(f"Cannot add low-rank updates of shapes {first.shape} and {second.shape}.")
    dtype = torch.promote_types(first.B.dtype, second.B.dtype)
    if first.scale == second.scale:
        B = torch.cat([first.B.to(dtype), sign * second.B.to(dtype)], dim=1)
        scale = first.scale
    else:  # folded in float32 at least: bfloat16 factors times a scale would round
        dtype = torch.promote_types(dtype, torch.float32)
        B = torch.cat([first.scale * first.B.to(dtype), sign * second.scale * second.B.to(dtype)], dim=1)
        scale = 1.0
    A = torch.cat([first.A.to(dtype), second.A.to(dtype)], dim=0)
    return LowRankUpdate(B, A, scale, torch.promote_types(first.dtype, second.dtype))
