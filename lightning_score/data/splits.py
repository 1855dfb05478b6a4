"""The split rules of the SCORE authors' processing scripts, as index arithmetic on a list of n images.

- :func:`random_split_indices`: OfficeHome, NICO++, ImageNet-R and any unsplit DomainBed folder.
  ``torch.utils.data.random_split`` over the ImageFolder order with sizes ``[int(0.8·n), n − int(0.8·n)]``
  and ``torch.Generator().manual_seed(17)``; train is the first part.
- :func:`shuffled_split_indices`: TerraIncognita. Per location, the annotation rows' positions shuffled by
  ``random.Random(17).shuffle``; the first ``int(0.8·n)`` are train.
- :func:`carve_indices`: beyond the paper, a validation part carved out of a train split (DomainBed's
  training-domain validation), only when asked for.

:func:`split_domain` puts them together for one domain of a read dataset: its fit, validation and test positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import random_split

from lightning_score.data.index import DomainSamples

__all__ = ["DomainSplit", "carve_indices", "random_split_indices", "shuffled_split_indices", "split_domain"]


@dataclass(frozen=True)
class DomainSplit:
    """Positions in one domain's train images followed by its test images (``DomainDataModule.domain_samples``)."""

    fit: list[int]
    """Training images (the whole train split unless ``val_fraction > 0``)."""
    val: list[int]
    """Validation images: a carved part of train, or else the test images that are not train images."""
    test: list[int]
    """The test split."""


def _train_size(n: int, test_fraction: float) -> int:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction} (the protocol uses 0.2).")
    return int((1.0 - test_fraction) * n)  # 1.0 - 0.2 == 0.8 exactly, so this is the authors' int(0.8 * n)


def random_split_indices(n: int, test_fraction: float = 0.2, seed: int = 17) -> tuple[list[int], list[int]]:
    """Train and test positions of ``n`` images as the authors' ``random_split`` call gives them.

    Returns:
        ``(train, test)``: positions in the input order, each in the order ``random_split`` lists them.
    """
    n_train = _train_size(n, test_fraction)
    if n <= 1:  # random_split would read sizes [0, 1] as fractions (same result, plus a warning)
        return [], list(range(n))
    train, test = random_split(range(n), [n_train, n - n_train], generator=torch.Generator().manual_seed(seed))
    return list(train.indices), list(test.indices)


def shuffled_split_indices(n: int, test_fraction: float = 0.2, seed: int = 17) -> tuple[list[int], list[int]]:
    """Train and test positions of ``n`` rows shuffled by ``random.Random(seed)`` (TerraIncognita's rule).

    Returns:
        ``(train, test)``: the first ``int(0.8·n)`` shuffled positions, and the rest.
    """
    positions = list(range(n))
    random.Random(seed).shuffle(positions)
    n_train = _train_size(n, test_fraction)
    return positions[:n_train], positions[n_train:]


def carve_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``n`` train positions into (kept, carved) with a seeded permutation; both sorted.

    ``carved`` holds ``int(n·fraction)`` positions (a validation part); ``fraction = 0`` carves nothing.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}.")
    n_carved = int(n * fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_carved:]), sorted(perm[:n_carved])


def split_domain(part: DomainSamples, val_fraction: float, split_seed: int) -> DomainSplit:
    """One domain's fit, validation and test positions (in its train images followed by its test images).

    ``val_fraction = 0`` (the paper): experts fit on the whole train split and the validation data is the test
    split minus any image that is also a train image; ``> 0``: that part of the train split is carved out
    (:func:`carve_indices`) for validation and the rest is fitted on.

    Example:
        >>> from pathlib import Path
        >>> part = DomainSamples(train=((Path("a"), 0), (Path("b"), 1)), test=((Path("b"), 1), (Path("c"), 0)))
        >>> split_domain(part, 0.0, 17)
        DomainSplit(fit=[0, 1], val=[3], test=[2, 3])
    """
    if not 0.0 <= val_fraction < 1.0:  # NaN included
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction} (0: validate on the test splits).")
    n_train = len(part.train)
    test = list(range(n_train, n_train + len(part.test)))
    if val_fraction > 0:
        fit, val = carve_indices(n_train, val_fraction, split_seed)
    else:
        train_paths = {path for path, _ in part.train}
        fit = list(range(n_train))
        val = [i for i, (path, _) in zip(test, part.test, strict=True) if path not in train_paths]
    return DomainSplit(fit=fit, val=val, test=test)
