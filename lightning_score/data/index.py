"""What reading a dataset gives: its classes and each domain's train and test images (a :class:`DatasetIndex`).

Every reader of :mod:`lightning_score.data.layouts` and :mod:`lightning_score.data.split_files` returns one,
built by :func:`index_of`, which refuses a domain with an empty split. :data:`LAYOUTS` names each layout and
the split rule it implies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_score.data.images import Sample

__all__ = ["LAYOUTS", "DatasetIndex", "DomainSamples", "index_of", "warn_missing_classes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DomainSamples:
    """One domain's images, split as the protocol splits them."""

    train: tuple[Sample, ...]
    """The train split (what this domain's expert trains on, unless a validation part is carved out)."""
    test: tuple[Sample, ...]
    """The test split."""


@dataclass(frozen=True)
class DatasetIndex:
    """A dataset read from disk: its classes, and each domain's train and test images."""

    root: Path
    layout: str
    """Which layout was read (a key of :data:`LAYOUTS`)."""
    classes: tuple[str, ...]
    """Class names in label order (folder names, or the preset's names when the data has none)."""
    domains: Mapping[str, DomainSamples]
    """Each domain's images, domains sorted by name."""


LAYOUTS: Mapping[str, str] = {
    "presplit": "read as is from train/<domain>/ and test/<domain>/",
    "presplit_filename_domains": "read as is from train/<class>/ and test/<class>/ (domain = file-name prefix)",
    "pacs_lists": "the lists <domain>_train_kfold.txt / <domain>_test_kfold.txt",
    "domainnet_lists": "the lists <domain>_train.txt / <domain>_test.txt",
    "fed_isic2019_csv": "train_test_split.csv",
    "terra_annotations": "per location, annotation rows shuffled by random.Random(seed), train = first 80 %",
    "unsplit_filename_domains": "one random_split of every image (seeded), domain = file-name prefix",
    "unsplit": "random_split of each domain in ImageFolder order, sizes [int(0.8·n), n − int(0.8·n)], seeded",
}
"""Each layout and the split rule it implies (for logs and docs)."""


def index_of(root: Path, layout: str, classes: Sequence[str], splits: Mapping[str, tuple[list, list]]) -> DatasetIndex:
    """Build a :class:`DatasetIndex`, refusing a domain with an empty train or test split."""
    if layout not in LAYOUTS:
        raise ValueError(f"index_of: layout {layout!r} is not one of {list(LAYOUTS)}.")
    domains = {}
    for domain in sorted(splits):
        train, test = splits[domain]
        for name, part in (("train", train), ("test", test)):
            if not part:
                raise ValueError(
                    f"Domain '{domain}' of '{root}' ({LAYOUTS[layout]}) has no {name} images. Every domain needs "
                    "both a train and a test split: add its images, or remove the domain."
                )
        domains[domain] = DomainSamples(train=tuple(train), test=tuple(test))
    return DatasetIndex(root=root, layout=layout, classes=tuple(classes), domains=domains)


def warn_missing_classes(where: str, classes: Sequence[str], found: Mapping[str, set[str]]) -> None:
    """Log, per folder, the classes that have no folder there (labels stay the union's, sorted)."""
    for folder, names in found.items():
        missing = [c for c in classes if c not in names]
        if missing:
            log.warning("%s: '%s' has no folder for classes %s; they have no images there.", where, folder, missing)
