"""What one merge reads from a :class:`~lightning_score.merging.FactorCache`, key by key.

The engine gets an :class:`ExpertSet` from :meth:`FactorCache.prepare` (the experts of the merge, in order) and
hands methods a :class:`KeyFactors` per key: each task's leading singular triplets, and results derived from them
for this set of experts, computed once. Both fall back to computing from the tensor the method passes when it is
not the exact tensor the engine loaded, so a method can never read factors of other inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from lightning_score.merging.shared_basis import canonicalize_signs, leading_triplets

if TYPE_CHECKING:
    from lightning_score.merging.factors import FactorCache

__all__ = ["ExpertSet", "KeyFactors"]

Derived = TypeVar("Derived")
Triplet = tuple[Tensor, Tensor, Tensor]


class ExpertSet:
    """The experts of one merge, in order, as a :class:`FactorCache` knows them (from :meth:`FactorCache.prepare`)."""

    def __init__(self, cache: FactorCache, fingerprints: tuple[str, ...], device: torch.device) -> None:
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

        Bit-identical to :func:`~lightning_score.merging.shared_basis.leading_triplets` of ``deltas``.
        """
        if not self._owns(deltas):
            return leading_triplets(deltas, k, sign_convention)
        cache, num_tasks = self._experts.cache, deltas.shape[0]
        keep = cache._rank_to_keep(tuple(deltas.shape), num_tasks)
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
        slot = ("derived", self._experts.name, self._key, str(deltas.dtype), name)
        value = cache._get(slot)
        if value is not None:
            cache.stats["derived_reused"] += 1
            return value
        value = compute()
        cache.stats["derived_computed"] += 1
        cache._put(slot, value)
        return value
