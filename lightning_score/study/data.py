"""The data a study evaluates on: each target's test images, and the sources' validation images for α.

A study tests 30-odd models on every target, for every seed, and searches α for every weight merge: the
same few thousand images, again and again. :class:`EvaluationImages` decodes each domain's evaluation
images once (through the same :class:`~lightning_score.data.DomainDataModule` loaders a user gets) and keeps
them in memory when they are small (the built-in digits: a few MB), streaming them from disk otherwise (real
datasets at 224 px). :class:`FoldData` is the LightningDataModule of one leave-one-domain-out fold: it
offers the target's test split to ``Trainer.predict``, and only the SOURCE domains' validation data to the
α search and ESM's proxy images; asking it for the target's validation or proxy data is an error. On several
ranks, each rank predicts its own contiguous run of whole test batches (:func:`.distributed.batch_shard`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from lightning_score.data import DomainDataModule, SourceDomains
from lightning_score.study.distributed import batch_shard

__all__ = ["EvaluationImages", "FoldData"]

log = logging.getLogger(__name__)

MakeData = Callable[[list[str], list[str]], DomainDataModule]


class EvaluationImages:
    """Every domain's test split and validation images, decoded once per study.

    Args:
        make_data: ``(train_domains, test_domains) -> DomainDataModule`` with the evaluation transform set.
        batch_size: Batch size when decoding.
        num_workers: Loader workers when decoding.
        cache_bytes: Keep decoded images in memory up to this many bytes in all; beyond, stream from disk.
    """

    def __init__(self, make_data: MakeData, batch_size: int, num_workers: int, cache_bytes: int = 2**30) -> None:
        self.make_data = make_data
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._datasets: dict[tuple[str, str, int | None], Dataset] = {}
        self.reads: list[tuple[str, str]] = []  #: (domain, split) in the order they were read from disk.

    def _setup(self, train: list[str], test: list[str]) -> DomainDataModule:
        data = self.make_data(train, test)
        data.prepare_data()
        data.setup("validate")
        return data

    def test(self, domain: str) -> Dataset:
        """The domain's test split, in the loader's order (the same order for every row)."""
        key = (domain, "test", None)
        if key not in self._datasets:
            loader = self._setup([], [domain]).test_dataloader()[0]
            self._datasets[key] = self._keep(loader.dataset, domain, "test")
        return self._datasets[key]

    def val(self, domain: str, limit: int | None) -> Dataset:
        """The domain's validation images (as its datamodule defines them), at most ``limit`` (a seeded subset)."""
        key = (domain, "val", limit)
        if key not in self._datasets:
            loader = self._setup([domain], [domain]).val_dataloader()
            if not loader:
                raise ValueError(
                    f"Domain '{domain}' has no validation data, which the α search needs: give the study a "
                    "val_fraction > 0 or data with held-out splits for its source domains."
                )
            dataset = loader.dataset
            if limit is not None and limit < len(dataset):
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
                dataset = Subset(dataset, sorted(order.tolist()))
            self._datasets[key] = self._keep(dataset, domain, "val")
        return self._datasets[key]

    def _keep(self, dataset: Dataset, domain: str, split: str) -> Dataset:
        """The dataset decoded into memory when it fits the budget, else as it is (read on every pass)."""
        self.reads.append((domain, split))
        count = len(dataset)  # type: ignore[arg-type]
        if count == 0:
            return dataset
        first = dataset[0][0]
        size = count * first.numel() * first.element_size()
        if self._cached_bytes + size > self.cache_bytes:
            log.info("%s %s split: %d images streamed from disk (over the memory budget).", domain, split, count)
            return dataset
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        images, labels = [], []
        for batch_images, batch_labels in loader:
            images.append(batch_images)
            labels.append(torch.as_tensor(batch_labels))
        self._cached_bytes += size
        return TensorDataset(torch.cat(images), torch.cat(labels))


class FoldData(LightningDataModule, SourceDomains):
    """One leave-one-domain-out fold: the target's test split; the sources' validation and proxy images.

    A :class:`~lightning_score.data.SourceDomains` (what :class:`~lightning_score.MergeModule` reads from a
    datamodule, as from a :class:`~lightning_score.data.DomainDataModule`): class names, domains, the sources'
    ``val_dataloader`` and ``proxy_dataloader``; and the target's ``test_dataloader`` and ``predict_dataloader``.

    Args:
        images: The study's decoded evaluation images.
        sources: The source domains (their experts are merged; their validation data chooses α).
        target: The held-out target domain (tested only).
        classnames: Class names, in label order.
        domains: Every domain of the dataset.
        default_templates: The dataset's own template set, if any.
        batch_size: Evaluation batch size.
        alpha_images: Validation images per source domain for the α search (``None``: all).
        proxy_data: Makes the DomainDataModule of the fold, for ESM's proxy images.
        rank: This process's rank: :meth:`predict_dataloader` gives its share of the test split.
        world_size: Number of ranks sharing the predictions.
    """

    def __init__(
        self,
        images: EvaluationImages,
        sources: Sequence[str],
        target: str,
        classnames: Sequence[str],
        domains: Sequence[str],
        default_templates: str | None,
        batch_size: int,
        alpha_images: int | None,
        proxy_data: Callable[[], DomainDataModule],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if target in sources:
            raise ValueError(f"The target '{target}' cannot also be a source of its own fold.")
        self.images = images
        self.sources = list(sources)
        self.target = target
        self._classnames = list(classnames)
        self._domains = list(domains)
        self._default_templates = default_templates
        self.batch_size = batch_size
        self.alpha_images = alpha_images
        self._proxy_factory = proxy_data
        self._proxy: DomainDataModule | None = None
        self.rank, self.world_size = rank, world_size

    @property
    def classnames(self) -> list[str]:
        """Class names, in label order."""
        return list(self._classnames)

    @property
    def domains(self) -> list[str]:
        """Every domain of the dataset."""
        return list(self._domains)

    @property
    def default_templates(self) -> str | None:
        """The dataset's own template set, if any."""
        return self._default_templates

    @property
    def train_domains(self) -> list[str]:
        """The source domains."""
        return list(self.sources)

    @property
    def test_domains(self) -> list[str]:
        """The target, alone."""
        return [self.target]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The source domains' validation images (never the target's): what α is chosen on."""
        return self._loader(ConcatDataset([self.images.val(d, self.alpha_images) for d in self.sources]))

    def test_dataloader(self) -> list[DataLoader]:
        """The target's test split."""
        return [self._loader(self.images.test(self.target))]

    def predict_dataloader(self) -> list[DataLoader]:
        """This rank's share of the target's test split, in a fixed order: per-image predictions line up across rows.

        One rank: the whole split. Several: a contiguous run of whole batches (:func:`.distributed.batch_shard`);
        the ranks' predictions concatenated in rank order are the whole split's, each image once.
        """
        dataset = self.images.test(self.target)
        if self.world_size > 1:
            share = batch_shard(len(dataset), self.batch_size, self.rank, self.world_size)  # type: ignore[arg-type]
            dataset = Subset(dataset, share)
        return [self._loader(dataset)]

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> Any:
        """Unlabelled images of a SOURCE domain (ESM's proxy data), from the fold's DomainDataModule."""
        if domain not in self.sources:
            raise ValueError(f"Proxy images come from source domains {self.sources} only, not '{domain}'.")
        if self._proxy is None:
            self._proxy = self._proxy_factory()
            self._proxy.prepare_data()
            self._proxy.setup("validate")
        return self._proxy.proxy_dataloader(domain, num_images, batch_size)
