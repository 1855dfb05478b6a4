"""Randomness for seeded merge methods (DARE, RandMix): one generator per (seed, key), never a running stream.

A merge split across processes (the engine's ``keys=``) or walking the keys in another order must draw the
same numbers for each key as a single-process merge, so every key gets its own generator, seeded from a hash
of the seed and the key's name. Draws are made on the CPU, in float32, whatever the compute device and
dtype, so the same seed gives the same bits on CPU and GPU and for any input precision.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["check_seed", "key_generator", "key_seed", "uniform_choices", "uniform_draws"]


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the method's seed and the key's name (BLAKE2b, stable across runs).

    Example:
        >>> key_seed(0, "proj") == key_seed(0, "proj") != key_seed(1, "proj")
        True
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def key_generator(seed: int, key: str) -> torch.Generator:
    """A fresh CPU generator for this key: the same numbers whatever else is drawn, in whatever order."""
    return torch.Generator(device="cpu").manual_seed(key_seed(seed, key))


def uniform_draws(seed: int, key: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Float32 uniform numbers in [0, 1) of ``shape``, drawn on the CPU from the key's own generator."""
    return torch.rand(shape, generator=key_generator(seed, key), dtype=torch.float32).to(device)


def uniform_choices(
    seed: int, key: str, count: int, shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> Tensor:
    """Integers uniform in {0, …, count − 1} of ``shape`` (int64), drawn on the CPU from the key's own generator."""
    return torch.randint(0, count, shape, generator=key_generator(seed, key)).to(device)


def check_seed(method: str, seed: object) -> int:
    """Return the seed if it is a non-negative integer; raise a ValueError naming the method otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{method}: seed must be a non-negative integer, got {seed!r}.")
    return seed
