"""What one merge reads of a :class:`~lightning_score.merging.FactorCache`, key by key.

:meth:`FactorCache.prepare <lightning_score.merging.FactorCache.prepare>` returns an :class:`ExpertSet` (the
experts of one merge, in order); the engine hands each method a :class:`KeyFactors` of it per key, as
``factors=`` (it implements :class:`~lightning_score.merging.registry.Factorizations`). Both read the cache
through :class:`FactorSource` only, the four members of :class:`FactorCache` they need.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from lightning_score.merging.factor_files import Triplet
from lightning_score.merging.svd import canonicalize_signs, leading_triplets

__all__ = ["ExpertSet", "FactorSource", "KeyFactors"]

Derived = TypeVar("Derived")


class FactorSource(Protocol):
    """What :class:`ExpertSet` and :class:`KeyFactors` read of a cache (:class:`FactorCache` implements it)."""

    #: Whether results derived from the factors are kept (else :meth:`derived` is never called).
    reuse_bases: bool

    def rank_to_keep(self, shape: tuple[int, ...], num_tasks: int) -> int:
        """How many leading triplets of a ``[..., m, n]`` key to keep for a merge of ``num_tasks`` experts."""
        ...

    def triplets(self, fingerprint: str, key: str, matrix: Callable[[], Tensor], rank: int, keep: int) -> Triplet:
        """One expert's leading triplets of a key (at least ``rank``), computed from ``matrix()`` if not held."""
        ...

    def derived(self, experts: Hashable, what: Hashable, compute: Callable[[], Derived]) -> Derived:
        """``compute()``'s result for the set of experts named ``experts``, computed once."""
        ...


class ExpertSet:
    """The experts of one merge, in order, as a factor cache knows them (from :meth:`FactorCache.prepare`).

    Args:
        cache: Where the factors are held (a :class:`~lightning_score.merging.FactorCache`).
        fingerprints: Each expert's content fingerprint, in the merge's order.
        device: The compute device.
    """

    def __init__(self, cache: FactorSource, fingerprints: tuple[str, ...], device: torch.device) -> None:
        self.cache = cache
        self.fingerprints = fingerprints
        self.device = device
        self.name = (fingerprints, str(device))

    def key(self, key: str, deltas: Tensor) -> KeyFactors:
        """What the merge of ``key`` may reuse; ``deltas`` is the ``[T, m, n]`` tensor the engine loaded for it."""
        return KeyFactors(self, key, deltas)


class KeyFactors:
    """What a method merging one key may reuse instead of computing: per-task SVDs and derived results.

    Methods receive it as ``factors=`` from the engine (see :meth:`KeyMerger.factorized_keys`). Both calls
    take the ``deltas`` the method is merging and fall back to computing from them when those are not the
    exact tensor the engine loaded (a method that transformed them first), so a method can never read factors
    of other inputs.

    Args:
        experts: The experts of the merge.
        key: The key being merged.
        deltas: The ``[T, m, n]`` tensor the engine loaded for it (changed in place, it is no longer its own).
    """

    def __init__(self, experts: ExpertSet, key: str, deltas: Tensor) -> None:
        self._experts = experts
        self._key = key
        self._deltas = deltas
        self._version = deltas._version

    def _owns(self, deltas: Tensor) -> bool:
        return deltas is self._deltas and deltas._version == self._version

    def leading(self, deltas: Tensor, k: int, sign_convention: str = "svd") -> Triplet:
        """Each task's k leading singular triplets: ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``.

        Bit-identical to :func:`~lightning_score.merging.svd.leading_triplets` of ``deltas``.
        """
        if not self._owns(deltas):
            return leading_triplets(deltas, k, sign_convention)
        cache, num_tasks = self._experts.cache, deltas.shape[0]
        keep = cache.rank_to_keep(tuple(deltas.shape), num_tasks)
        parts = [
            cache.triplets(fingerprint, self._key, lambda t=t: deltas[t], k, keep)
            for t, fingerprint in enumerate(self._experts.fingerprints)
        ]
        U = torch.stack([U_t[:, :k] for U_t, _, _ in parts])
        S = torch.stack([S_t[:k] for _, S_t, _ in parts])
        Vh = torch.stack([Vh_t[:k] for _, _, Vh_t in parts])
        if sign_convention == "canonical":
            U, Vh = canonicalize_signs(U, Vh)
        return U, S, Vh

    def reuse(self, deltas: Tensor, name: Hashable, compute: Callable[[], Derived]) -> Derived:
        """``compute()``'s result for this key and these experts, computed once per set of experts.

        Args:
            deltas: The tensor being merged (the result is reused only for the engine's own).
            name: What is computed, with every option it depends on, e.g. ``("shared_basis", "svd")``.
            compute: Computes it from ``deltas`` (and :meth:`leading`).
        """
        cache = self._experts.cache
        if not cache.reuse_bases or not self._owns(deltas):
            return compute()
        return cache.derived(self._experts.name, (self._key, str(deltas.dtype), name), compute)
