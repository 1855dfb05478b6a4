"""The split rules of the SCORE authors' processing scripts, as index arithmetic on a list of n images.

- :func:`random_split_indices`: OfficeHome, NICO++, ImageNet-R and any unsplit DomainBed folder.
  ``torch.utils.data.random_split`` over the ImageFolder order with sizes ``[int(0.8·n), n − int(0.8·n)]``
  and ``torch.Generator().manual_seed(17)``; train is the first part.
- :func:`shuffled_split_indices`: TerraIncognita. Per location, the annotation rows' positions shuffled by
  ``random.Random(17).shuffle``; the first ``int(0.8·n)`` are train.
- :func:`carve_indices`: beyond the paper, a validation part carved out of a train split (DomainBed's
  training-domain validation), only when asked for.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import random_split

__all__ = ["carve_indices", "random_split_indices", "shuffled_split_indices"]


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
