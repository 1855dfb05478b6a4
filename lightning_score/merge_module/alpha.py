"""Choosing the scaling coefficient α of a merged update by accuracy on the source domains' validation data.

Two searches over ``accuracy(α)`` (one evaluation = one pass over the validation data at θ₀ + α·τ*):

* :func:`grid_search` (the default): every α of a grid.
* :func:`golden_section_search`: golden-section search on [0, 2], the search the authors of ESM
  (Essential Subspace Merging) use to tune α: two interior points at the golden ratio, the bracket shrinks
  around the better one by a factor 0.618 per step, one new evaluation per step, until the bracket is
  narrower than ``tolerance`` (0.01) or after ``max_iterations`` (15) steps.

Both return the α with the highest accuracy among those evaluated; ties go to the α closest to 1 (the
unscaled merge), then to the one evaluated first. :meth:`AlphaSearchResult.edge` says when the choice lies at
the end of the searched range (the best α may then lie beyond it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALPHA_SEARCHES",
    "DEFAULT_ALPHA_GRID",
    "AlphaSearchResult",
    "golden_section_search",
    "grid_search",
    "search_alpha",
]

ALPHA_SEARCHES = ("grid", "golden")
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618..., the bracket's shrink factor per step
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)
"""The α values ``MergeModule(alpha="auto")`` tries by default (``alpha_search="grid"``)."""


@dataclass
class AlphaSearchResult:
    """What an α search evaluated and chose.

    Attributes:
        method: ``"grid"`` or ``"golden"``.
        evaluated: ``(α, accuracy)`` pairs in the order they were evaluated.
        selected: The chosen α.
        low: The smallest α the search could choose (the grid's smallest value, the bracket's left end).
        high: The largest.
        margin: How close to an end counts as at it (0 for a grid; twice the tolerance for golden section,
            which never evaluates the ends themselves).
    """

    method: str
    evaluated: list[tuple[float, float]] = field(default_factory=list)
    selected: float = 1.0
    low: float | None = None
    high: float | None = None
    margin: float = 0.0

    def edge(self) -> str | None:
        """``"upper"`` or ``"lower"`` when α was chosen at that end of the searched range, else None.

        The lower end counts only above 0: α below 0 would undo the experts.

        Example:
            >>> grid_search(lambda a: a, [0.5, 1.0, 1.5]).edge()
            'upper'
        """
        if self.low is None or self.high is None or not self.high > self.low:
            return None
        if self.selected >= self.high - self.margin:
            return "upper"
        if self.low > 0 and self.selected <= self.low + self.margin:
            return "lower"
        return None

    def summary(self) -> str:
        """One line for the log: every α evaluated with its accuracy, and the choice.

        Example:
            >>> grid_search(lambda a: a / 2, [0.5, 1.0]).summary()
            'α search (grid) on the source validation data (0.5: 0.250, 1: 0.500); chose α = 1.'
        """
        table = ", ".join(f"{a:.3g}: {acc:.3f}" for a, acc in self.evaluated)
        return f"α search ({self.method}) on the source validation data ({table}); chose α = {self.selected:.3g}."

    def edge_warning(self) -> str | None:
        """One sentence for a warning when :meth:`edge` is not None."""
        edge = self.edge()
        if edge is None:
            return None
        end, beyond = (self.high, "larger") if edge == "upper" else (self.low, "smaller")
        where = "grid" if self.method == "grid" else "search bracket"
        fix = "extend alpha_grid" if self.method == "grid" else "set a number for alpha"
        return (
            f"α search chose α = {self.selected:.3g}, at the {edge} end of its {where} ({end:.3g}): the best α may be "
            f"{beyond} than any value tried; {fix} to look further."
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for reports: ``{"method", "alphas", "val_acc", "selected"}``."""
        return {
            "method": self.method,
            "alphas": [a for a, _ in self.evaluated],
            "val_acc": [acc for _, acc in self.evaluated],
            "selected": self.selected,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything, as plain values (what a checkpoint keeps; :meth:`from_state_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AlphaSearchResult:
        """The result :meth:`state_dict` (or, from an older checkpoint, :meth:`to_dict`) describes.

        Example:
            >>> result = grid_search(lambda a: -abs(a - 0.4), [0.2, 0.4, 1.0])
            >>> AlphaSearchResult.from_state_dict(result.state_dict()) == result
            True
        """
        if "evaluated" not in state:  # an older checkpoint kept to_dict()
            pairs = list(zip(state["alphas"], state["val_acc"], strict=True))
            return cls(state["method"], pairs, state["selected"])
        return cls(**{**state, "evaluated": [(float(a), float(acc)) for a, acc in state["evaluated"]]})


def _best(evaluated: Sequence[tuple[float, float]]) -> float:
    order = range(len(evaluated))
    index = max(order, key=lambda i: (evaluated[i][1], -abs(evaluated[i][0] - 1.0), -i))
    return evaluated[index][0]


def grid_search(accuracy: Callable[[float], float], grid: Sequence[float]) -> AlphaSearchResult:
    """Evaluate every α of ``grid``; choose the most accurate.

    Example:
        >>> grid_search(lambda a: -((a - 0.6) ** 2), [0.2, 0.6, 1.0]).selected
        0.6
    """
    if not grid:
        raise ValueError("The α grid is empty: give at least one value, e.g. alpha_grid=[0.5, 1.0].")
    evaluated = [(float(alpha), float(accuracy(float(alpha)))) for alpha in grid]
    return AlphaSearchResult("grid", evaluated, _best(evaluated), float(min(grid)), float(max(grid)))


def golden_section_search(
    accuracy: Callable[[float], float],
    low: float = 0.0,
    high: float = 2.0,
    tolerance: float = 0.01,
    max_iterations: int = 15,
) -> AlphaSearchResult:
    """Golden-section search for the most accurate α in ``[low, high]`` (ESM's authors' settings by default).

    Args:
        accuracy: α → validation accuracy (higher is better).
        low: Left end of the bracket.
        high: Right end of the bracket.
        tolerance: Stop once the bracket is narrower than this.
        max_iterations: At most this many steps after the first two evaluations.

    Returns:
        Every evaluation, and the best α evaluated.

    Example:
        >>> result = golden_section_search(lambda a: -((a - 1.3) ** 2))
        >>> abs(result.selected - 1.3) < 0.01, len(result.evaluated) <= 17
        (True, True)
    """
    if not low < high:
        raise ValueError(f"The golden-section bracket needs low < high, got [{low}, {high}].")
    evaluated: list[tuple[float, float]] = []

    def evaluate(alpha: float) -> float:
        value = float(accuracy(alpha))
        evaluated.append((alpha, value))
        return value

    a, b = float(low), float(high)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    for _ in range(max_iterations):
        if fc > fd:  # the maximum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = evaluate(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = evaluate(d)
        if abs(b - a) < tolerance:
            break
    return AlphaSearchResult("golden", evaluated, _best(evaluated), float(low), float(high), 2 * tolerance)


def search_alpha(accuracy: Callable[[float], float], search: str, grid: Sequence[float]) -> AlphaSearchResult:
    """The search named ``search`` (one of :data:`ALPHA_SEARCHES`) over ``accuracy``.

    ``"golden"``: :func:`golden_section_search` with its defaults; otherwise :func:`grid_search` over ``grid``.

    Example:
        >>> search_alpha(lambda a: -((a - 0.6) ** 2), "grid", [0.2, 0.6, 1.0]).method
        'grid'
    """
    if search == "golden":
        return golden_section_search(accuracy)
    return grid_search(accuracy, grid)
