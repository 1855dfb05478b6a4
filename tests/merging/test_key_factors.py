"""key_factors: what one merge reads of a cache, per key, through the FactorSource interface only."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import pytest
import torch

from lightning_score.merging import FactorCache
from lightning_score.merging.key_factors import ExpertSet, FactorSource, KeyFactors
from lightning_score.merging.svd import leading_triplets


class _Source:
    """A FactorSource that records every call; it computes the full SVD and keeps ``keep`` triplets."""

    def __init__(self, reuse_bases: bool = True) -> None:
        self.reuse_bases = reuse_bases
        self.calls: list[tuple[Any, ...]] = []
        self.derived_values: dict[Hashable, Any] = {}

    def rank_to_keep(self, shape: tuple[int, ...], num_tasks: int) -> int:
        self.calls.append(("rank_to_keep", shape, num_tasks))
        return 3

    def triplets(self, fingerprint: str, key: str, matrix: Callable[[], torch.Tensor], rank: int, keep: int) -> Any:
        self.calls.append(("triplets", fingerprint, key, rank, keep))
        U, S, Vh = torch.linalg.svd(matrix(), full_matrices=False)
        return U[:, :keep], S[:keep], Vh[:keep]

    def derived(self, experts: Hashable, what: Hashable, compute: Callable[[], Any]) -> Any:
        self.calls.append(("derived", experts, what))
        if (experts, what) not in self.derived_values:
            self.derived_values[(experts, what)] = compute()
        return self.derived_values[(experts, what)]


def _deltas(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(seed))


def _factors(source: _Source, deltas: torch.Tensor) -> KeyFactors:
    return ExpertSet(source, ("fp0", "fp1"), torch.device("cpu")).key("w", deltas)


def test_an_expert_set_is_named_by_its_experts_and_device() -> None:
    experts = ExpertSet(_Source(), ("fp0", "fp1"), torch.device("cpu"))
    assert experts.name == (("fp0", "fp1"), "cpu") and experts.fingerprints == ("fp0", "fp1")
    assert isinstance(experts.key("w", _deltas()), KeyFactors)


@pytest.mark.parametrize("sign_convention", ["svd", "canonical"])
def test_leading_reads_each_experts_triplets_and_equals_the_computation(sign_convention: str) -> None:
    source, deltas = _Source(), _deltas()
    got = _factors(source, deltas).leading(deltas, 2, sign_convention)
    for factor, expected in zip(got, leading_triplets(deltas, 2, sign_convention), strict=True):
        assert torch.equal(factor, expected)
    assert source.calls == [
        ("rank_to_keep", (2, 7, 5), 2),
        ("triplets", "fp0", "w", 2, 3),
        ("triplets", "fp1", "w", 2, 3),
    ]


def test_other_or_changed_deltas_are_computed_without_the_source() -> None:
    source, deltas = _Source(), _deltas()
    factors = _factors(source, deltas)
    other = deltas.clone()
    assert torch.equal(factors.leading(other, 2)[0], leading_triplets(other, 2)[0])
    assert factors.reuse(other, "basis", lambda: "fresh") == "fresh"
    deltas.mul_(2)  # changed in place after the engine loaded it
    assert torch.equal(factors.leading(deltas, 1)[1], leading_triplets(deltas, 1)[1])
    assert factors.reuse(deltas, "basis", lambda: "fresh again") == "fresh again"
    assert source.calls == []


def test_reuse_goes_through_derived_with_the_key_dtype_and_name() -> None:
    source, deltas = _Source(), _deltas()
    factors = _factors(source, deltas)
    assert factors.reuse(deltas, ("shared_basis", "svd"), lambda: 1) == 1
    assert factors.reuse(deltas, ("shared_basis", "svd"), lambda: 2) == 1  # computed once
    expected = ("derived", (("fp0", "fp1"), "cpu"), ("w", "torch.float32", ("shared_basis", "svd")))
    assert source.calls == [expected, expected]


def test_without_reuse_bases_every_call_computes() -> None:
    source, deltas = _Source(reuse_bases=False), _deltas()
    factors = _factors(source, deltas)
    assert [factors.reuse(deltas, "x", lambda value=value: value) for value in (1, 2)] == [1, 2]
    assert source.calls == []


def test_a_factor_cache_offers_the_source_interface() -> None:
    members = [name for name in FactorSource.__annotations__] + ["rank_to_keep", "triplets", "derived"]
    cache = FactorCache(min_tasks=4)
    assert all(hasattr(cache, name) for name in members)
    assert cache.rank_to_keep((12, 40), 2) == 6 and cache.rank_to_keep((12, 40), 6) == 3  # max(r/T, r/min_tasks)
