"""α searches: the golden-section search against a reference written here from its description, and the grid."""

from __future__ import annotations

import math

import pytest
from torch.utils.data import DataLoader, Subset

from lightning_score import DomainDataModule
from lightning_score.merge_module.alpha import golden_section_search, grid_search


def reference_golden(f, low: float, high: float, tol: float, iterations: int) -> list[float]:
    """Golden-section search as the ESM authors describe it, in float64: the points evaluated, in order."""
    ratio = (5**0.5 - 1) / 2
    points = []
    left, right = low, high
    inner = [right - ratio * (right - left), left + ratio * (right - left)]
    values = []
    for x in inner:
        points.append(x)
        values.append(f(x))
    step = 0
    while step < iterations:
        step += 1
        if values[0] > values[1]:
            right = inner[1]
            inner = [right - ratio * (right - left), inner[0]]
            values = [None, values[0]]
            points.append(inner[0])
            values[0] = f(inner[0])
        else:
            left = inner[0]
            inner = [inner[1], left + ratio * (right - left)]
            values = [values[1], None]
            points.append(inner[1])
            values[1] = f(inner[1])
        if right - left < tol:
            break
    return points


@pytest.mark.parametrize("peak", [0.05, 0.37, 1.0, 1.31, 1.97])
def test_golden_section_evaluates_the_reference_points_and_finds_the_peak(peak: float) -> None:
    def f(a):
        return -abs(a - peak)

    result = golden_section_search(f)
    expected = reference_golden(f, 0.0, 2.0, 0.01, 15)
    assert [a for a, _ in result.evaluated] == pytest.approx(expected, abs=1e-12)
    assert len(result.evaluated) <= 17 and all(0.0 <= a <= 2.0 for a, _ in result.evaluated)
    assert abs(result.selected - peak) < 0.01
    assert result.selected == max(result.evaluated, key=lambda p: p[1])[0]
    assert result.method == "golden"


def test_golden_section_stops_on_the_bracket_width() -> None:
    # the bracket shrinks by 0.618 per step: 2·0.618^n < 0.01 first at n = 12 steps, 14 evaluations
    result = golden_section_search(lambda a: -((a - 0.8) ** 2))
    steps = math.ceil(math.log(0.01 / 2.0) / math.log((5**0.5 - 1) / 2))
    assert len(result.evaluated) == 2 + steps
    short = golden_section_search(lambda a: -((a - 0.8) ** 2), max_iterations=3)
    assert len(short.evaluated) == 5


def test_ties_go_to_the_alpha_closest_to_one() -> None:
    flat = golden_section_search(lambda a: 0.5)  # a flat accuracy: every α ties
    assert flat.selected == min((a for a, _ in flat.evaluated), key=lambda a: abs(a - 1.0))
    grid = grid_search(lambda a: 0.5 if a in (0.4, 0.9, 1.6) else 0.1, [0.4, 0.9, 1.6, 0.2])
    assert grid.selected == 0.9 and grid.evaluated[0] == (0.4, 0.5)
    assert grid.to_dict() == {"method": "grid", "alphas": [0.4, 0.9, 1.6, 0.2], "val_acc": [0.5, 0.5, 0.5, 0.1],
                              "selected": 0.9}  # fmt: skip


def test_bad_search_settings() -> None:
    with pytest.raises(ValueError, match="grid is empty"):
        grid_search(lambda a: 0.0, [])
    with pytest.raises(ValueError, match="low < high"):
        golden_section_search(lambda a: 0.0, low=2.0, high=0.0)


def test_a_choice_at_the_end_of_the_range_is_flagged() -> None:
    rising = grid_search(lambda a: a, [0.2, 0.4, 1.6])
    assert rising.selected == 1.6 and rising.edge() == "upper"
    assert "upper end of its grid (1.6)" in rising.edge_warning() and "extend alpha_grid" in rising.edge_warning()
    falling = grid_search(lambda a: -a, [0.2, 0.4, 1.6])
    assert falling.selected == 0.2 and falling.edge() == "lower"
    assert grid_search(lambda a: -((a - 0.4) ** 2), [0.2, 0.4, 1.6]).edge() is None  # inside: no warning
    assert grid_search(lambda a: -a, [0.0, 0.5]).edge() is None  # α = 0 ends the range: nothing lies below it
    assert grid_search(lambda a: a, [1.0]).edge() is None  # one value: no range to extend
    assert golden_section_search(lambda a: a).edge() == "upper"  # the maximum is at 2, beyond the bracket's inside
    assert golden_section_search(lambda a: -((a - 1.3) ** 2)).edge() is None
    assert golden_section_search(lambda a: -a, low=0.5).edge() == "lower"


def test_merge_module_warns_when_alpha_is_chosen_at_the_grid_edge(quick_base, expert_task_vectors) -> None:
    import lightning as L

    from lightning_score import MergeModule
    from tests.experts import MODEL, QUIET, digits

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    module = MergeModule(MODEL, str(quick_base), task_vectors=paths, method="task_arithmetic", alpha="auto",
                         alpha_grid=[0.0, 0.05], templates="digits")  # fmt: skip
    with pytest.warns(UserWarning, match=r"chose α = 0.05, at the upper end of its grid \(0.05\): the best α may be "):
        L.Trainer(**QUIET).test(module, datamodule=digits(train_domains=["rot0", "rot60"], test_domains=["rot30"]),
                                verbose=False)  # fmt: skip
    assert module.alpha_search_result.selected == 0.05


class _EmptyValidation(DomainDataModule):
    """The real digits, but every source domain's validation loader holds no image (a split that came out empty)."""

    def val_dataloader(self) -> list[DataLoader]:
        empty = Subset(self.dataset(self.train_domains[0], "val"), [])
        return [DataLoader(empty, batch_size=8) for _ in self.train_domains]


@pytest.mark.parametrize("alpha_search", ["grid", "golden"])
def test_alpha_auto_with_no_validation_images_fails_naming_the_domains_before_merging(
    alpha_search: str, quick_base, expert_task_vectors
) -> None:
    import lightning as L

    from lightning_score import MergeModule
    from tests.experts import MODEL, QUIET

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    module = MergeModule(MODEL, str(quick_base), task_vectors=paths, method="task_arithmetic", alpha="auto",
                         alpha_search=alpha_search, templates="digits")  # fmt: skip
    data = _EmptyValidation("builtin:digits", train_domains=["rot0", "rot60"], test_domains=["rot30"], num_workers=0)
    with pytest.raises(ValueError, match=r"has no images for 'rot0'; 'rot60': every α would score 0\. Give those"):
        L.Trainer(**QUIET).test(module, datamodule=data, verbose=False)
    assert module.head is None and module.merged is None and module.merge_seconds is None  # before any work
    assert module.alpha_search_result is None
