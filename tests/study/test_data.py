"""The study's evaluation data: decoded once, kept in memory within a budget, sources only for α and proxies."""

from __future__ import annotations

from typing import Protocol

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_score.data import ClassNames, SourceDomains
from lightning_score.study.data import EvaluationImages, FoldData


class _Split(Dataset):
    """12 images whose pixels all equal ``offset + index``, labels 0, 1, 2, 0, …"""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 4, 4), float(self.offset + index)), index % 3


class _Domains:
    """A stand-in DomainDataModule: domain ``dK``'s test split starts at 100·K, its validation split at 100·K + 50."""

    def __init__(self, train: list[str], test: list[str]) -> None:
        self.train, self.test = train, test

    def prepare_data(self) -> None: ...

    def setup(self, stage: str) -> None: ...

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(_Split(100 * int(d[1:])), batch_size=5) for d in self.test]

    def val_dataloader(self) -> DataLoader:
        (domain,) = self.train
        return DataLoader(_Split(100 * int(domain[1:]) + 50), batch_size=5)

    def proxy_dataloader(self, domain: str, num_images: int, batch_size: int | None) -> str:
        return f"proxy of {domain}"


def test_images_are_decoded_once_and_kept_within_the_budget() -> None:
    images = EvaluationImages(_Domains, batch_size=4, num_workers=0, cache_bytes=12 * 3 * 16 * 4)  # one split
    test = images.test("d1")
    assert isinstance(test, TensorDataset) and len(test) == 12
    assert [float(test[i][0][0, 0, 0]) for i in range(12)] == [100.0 + i for i in range(12)]  # the loader's order
    assert images.test("d1") is test and images.reads == [("d1", "test")]  # decoded once
    streamed = images.test("d2")  # over the budget: the dataset as it is, read on every pass
    assert isinstance(streamed, _Split) and len(streamed) == 12 and images.reads == [("d1", "test"), ("d2", "test")]
    val = images.val("d3", limit=5)
    assert len(val) == 5 and {float(val[i][0][0, 0, 0]) for i in range(5)} <= {350.0 + i for i in range(12)}
    assert images.val("d3", limit=5) is val and len(images.val("d3", limit=None)) == 12


def test_a_fold_offers_the_target_to_predict_and_only_the_sources_to_alpha_and_proxies() -> None:
    images = EvaluationImages(_Domains, batch_size=4, num_workers=0)
    fold = FoldData(
        images, ["d1", "d2"], "d3", ["a", "b", "c"], ["d1", "d2", "d3"], None, 8, None, lambda: _Domains([], [])
    )
    assert fold.train_domains == ["d1", "d2"] and fold.test_domains == ["d3"] and fold.num_classes == 3
    seen = {float(x[0, 0, 0]) // 50 for batch, _ in fold.val_dataloader() for x in batch}
    assert seen == {3.0, 5.0}  # the validation images of d1 (150-161) and d2 (250-261), nothing of d3
    (loader,) = fold.predict_dataloader()
    assert {float(x[0, 0, 0]) // 100 for batch, _ in loader for x in batch} == {3.0}
    assert ("d3", "val") not in images.reads
    assert fold.proxy_dataloader("d2", 4) == "proxy of d2"
    with pytest.raises(ValueError, match="source domains"):
        fold.proxy_dataloader("d3", 4)
    with pytest.raises(ValueError, match="cannot also be a source"):
        FoldData(images, ["d1", "d3"], "d3", ["a"], ["d1", "d3"], None, 8, None, lambda: _Domains([], []))


def _protocol_members(protocol: type) -> set[str]:
    """The names a Protocol declares (its own and its parents'), without Protocol's machinery."""
    protocols = [cls for cls in protocol.__mro__ if getattr(cls, "_is_protocol", False) and cls is not Protocol]
    return {name for cls in protocols for name in vars(cls) if name[0] != "_"}


def test_a_fold_is_the_source_domains_merge_module_reads() -> None:
    """FoldData is a SourceDomains, and implements every member itself (none falls back to the protocol's stub)."""
    images = EvaluationImages(_Domains, batch_size=4, num_workers=0)
    fold = FoldData(
        images, ["d1", "d2"], "d3", ["a", "b", "c"], ["d1", "d2", "d3"], "digits", 8, None, lambda: _Domains([], [])
    )
    assert isinstance(fold, SourceDomains) and isinstance(fold, ClassNames)
    members = _protocol_members(SourceDomains)
    assert {"classnames", "domains", "train_domains", "test_domains", "default_templates"} <= members
    assert {"val_dataloader", "proxy_dataloader"} <= members
    inherited = {name for name in members if getattr(FoldData, name) is getattr(SourceDomains, name)}
    assert not inherited
    assert (fold.classnames, fold.domains, fold.default_templates) == (["a", "b", "c"], ["d1", "d2", "d3"], "digits")
    assert (fold.train_domains, fold.test_domains) == (["d1", "d2"], ["d3"])
    fold.classnames.append("changed")  # read-only: a copy, the fold's own list stays
    assert fold.classnames == ["a", "b", "c"]
