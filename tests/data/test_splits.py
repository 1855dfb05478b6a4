"""The split rules as index arithmetic: the authors' random_split and shuffle exactly, a carved validation part."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import random_split

from lightning_score.data.index import DomainSamples
from lightning_score.data.splits import (
    DomainSplit,
    carve_indices,
    random_split_indices,
    shuffled_split_indices,
    split_domain,
)

SIZES = [0, 1, 2, 3, 4, 5, 7, 10, 17, 99, 250]


@pytest.mark.parametrize("n", SIZES)
def test_random_split_indices_is_the_authors_random_split(n: int) -> None:
    sizes = [int(0.8 * n), n - int(0.8 * n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when it reads [0, 1] as fractions
        train, test = random_split(range(n), sizes, generator=torch.Generator().manual_seed(17))
    assert random_split_indices(n) == (list(train), list(test))
    assert random_split_indices(n, 0.2, 17) == (list(train), list(test))
    got_train, got_test = random_split_indices(n)
    assert len(got_train) == int(0.8 * n) and sorted(got_train + got_test) == list(range(n))


def test_random_split_indices_warns_nothing_for_tiny_domains() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert random_split_indices(0) == ([], [])
        assert random_split_indices(1) == ([], [0])


def test_random_split_indices_follows_its_seed_and_fraction() -> None:
    assert random_split_indices(20, 0.2, 17) != random_split_indices(20, 0.2, 18)
    train, test = random_split_indices(20, 0.5, 3)
    reference = random_split(range(20), [10, 10], generator=torch.Generator().manual_seed(3))
    assert (train, test) == tuple(list(part) for part in reference)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", [17, 0])
def test_shuffled_split_indices_is_random_random_shuffle(n: int, seed: int) -> None:
    positions = list(range(n))
    random.Random(seed).shuffle(positions)
    assert shuffled_split_indices(n, 0.2, seed) == (positions[: int(0.8 * n)], positions[int(0.8 * n) :])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_test_fraction_outside_0_1_is_refused(bad: float) -> None:
    for split in (random_split_indices, shuffled_split_indices):
        with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got .* \(the protocol uses 0\.2\)"):
            split(10, bad)


# --- carve_indices ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.2), (7, 0.5), (100, 0.1), (3, 0.25), (1, 0.9), (0, 0.5)])
def test_carve_indices_splits_into_sorted_disjoint_parts_of_the_right_size(n: int, fraction: float) -> None:
    kept, carved = carve_indices(n, fraction, seed=5)
    assert len(carved) == int(n * fraction) and len(kept) == n - int(n * fraction)
    assert kept == sorted(kept) and carved == sorted(carved)
    assert not set(kept) & set(carved) and sorted(kept + carved) == list(range(n))


def test_carve_indices_is_deterministic_and_follows_its_seed() -> None:
    assert carve_indices(50, 0.2, 7) == carve_indices(50, 0.2, 7)
    assert carve_indices(50, 0.2, 7) != carve_indices(50, 0.2, 8)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()
    assert carve_indices(50, 0.2, 7)[1] == sorted(perm[:10])  # the seeded permutation's first int(n·f)


def test_a_zero_val_fraction_carves_nothing() -> None:
    assert carve_indices(9, 0.0, 17) == (list(range(9)), [])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_a_val_fraction_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got"):
        carve_indices(10, bad, 17)


# --- split_domain -------------------------------------------------------------------------------------


def _part(train: list[str], test: list[str]) -> DomainSamples:
    return DomainSamples(
        train=tuple((Path(name), i % 2) for i, name in enumerate(train)),
        test=tuple((Path(name), i % 2) for i, name in enumerate(test)),
    )


def test_the_paper_fits_on_all_of_train_and_validates_on_test_images_it_never_trained_on() -> None:
    part = _part(["a", "b", "c", "d"], ["c", "e", "a", "f"])  # c and a are in both splits (TerraIncognita can)
    split = split_domain(part, 0.0, 17)
    assert split == DomainSplit(fit=[0, 1, 2, 3], val=[5, 7], test=[4, 5, 6, 7])
    positions = [*part.train, *part.test]  # positions index train then test
    assert {positions[i][0].name for i in split.val} == {"e", "f"}


def test_without_overlap_validation_is_the_whole_test_split() -> None:
    split = split_domain(_part(["a", "b"], ["c", "d", "e"]), 0.0, 17)
    assert split.fit == [0, 1] and split.val == split.test == [2, 3, 4]


def test_a_val_fraction_carves_validation_out_of_train_and_leaves_test_alone() -> None:
    part = _part([f"t{i}" for i in range(10)], ["a", "t0"])
    split = split_domain(part, 0.3, 17)
    kept, carved = carve_indices(10, 0.3, 17)
    assert split == DomainSplit(fit=kept, val=carved, test=[10, 11])
    assert len(split.val) == 3 and all(i < 10 for i in split.val)  # only train positions
    assert split_domain(part, 0.3, 18).val != split.val  # the split seed is used
