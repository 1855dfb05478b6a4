"""From a dataset folder to each domain's train and test images, as the SCORE authors split them.

:func:`read_dataset` detects the layout of ``root`` (first match wins) and reads it with its split rule:

=============================  ======================================================  ===========================
layout                         what ``root`` holds                                     split
=============================  ======================================================  ===========================
``presplit``                   ``train/<domain>/<class>/…`` and ``test/<domain>/…``    read as is
``presplit_filename_domains``  ``train/<class>/<domain>_<n>.jpg`` and ``test/…``       read as is (ImageNet-R)
``pacs_lists``                 ``<domain>_train_kfold.txt`` + ``_test_kfold.txt``      the lists (PACS)
``domainnet_lists``            ``<domain>_train.txt`` + ``<domain>_test.txt``          the lists (DomainNet)
``fed_isic2019_csv``           ``train_test_split.csv`` + ``ISIC_2019_Training_Input``  the csv (Fed-ISIC2019)
``terra_annotations``          ``eccv_18_annotation_files/*.json`` + the images        per location, seeded shuffle
``unsplit_filename_domains``   ``<class>/<domain>_<n>.jpg``                            one random_split of all
``unsplit``                    ``<domain>/<class>/…`` (DomainBed's layout)             random_split per domain
=============================  ======================================================  ===========================

The list/csv/annotation readers live in :mod:`lightning_score.data.split_files`. Every reader returns a
:class:`DatasetIndex`: the class names (label ``i`` is ``classes[i]``) and, per domain, its train and test
images, each in the order the authors' own loaders list them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lightning_score.data.images import IMAGE_EXTENSIONS, Sample, image_folder_samples, subfolders
from lightning_score.data.index import DatasetIndex, index_of, warn_missing_classes
from lightning_score.data.presets import DatasetPreset
from lightning_score.data.split_files import (
    read_domainnet_lists,
    read_fed_isic2019_csv,
    read_pacs_lists,
    read_terra_annotations,
)
from lightning_score.data.splits import random_split_indices

__all__ = ["detect_layout", "read_dataset"]

log = logging.getLogger(__name__)


def _has_flat_class_folders(folder: Path) -> bool:
    """Whether ``folder``'s first sub-folder holds image files directly and no folders (``<class>/<image>``)."""
    children = subfolders(folder) if folder.is_dir() else []
    if not children:
        return False
    entries = list(children[0].iterdir())
    has_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
    return has_images and not any(p.is_dir() for p in entries)


def detect_layout(root: Path) -> str:
    """The layout of a dataset folder (see the module docstring); ``unsplit`` when nothing else fits."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "presplit_filename_domains" if _has_flat_class_folders(root / "train") else "presplit"
    if any(root.glob("*_train_kfold.txt")):
        return "pacs_lists"
    if any(root.glob("*_train.txt")) or any((d / f"{d.name}_train.txt").is_file() for d in subfolders(root)):
        return "domainnet_lists"
    if (root / "train_test_split.csv").is_file():
        return "fed_isic2019_csv"
    if (root / "eccv_18_annotation_files").is_dir():
        return "terra_annotations"
    if _has_flat_class_folders(root):
        return "unsplit_filename_domains"
    return "unsplit"


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(
            f"Dataset root '{root}' does not exist. Point `root` at a dataset folder (e.g. "
            "ROOT/<domain>/<class>/<image>, DomainBed's layout; docs/protocol.md lists every layout), or use "
            "root='builtin:digits'."
        )
    if not root.is_dir():
        raise ValueError(f"Dataset root '{root}' is a file; it must be a dataset folder (see docs/protocol.md).")


def read_dataset(
    root: Path, test_fraction: float = 0.2, split_seed: int = 17, preset: DatasetPreset | None = None
) -> DatasetIndex:
    """Read a dataset folder with the split rule of its layout.

    Args:
        root: The dataset folder.
        test_fraction: Test share of the seeded splits (``unsplit``, ``unsplit_filename_domains``,
            ``terra_annotations``); 0.2 in the protocol. The other layouts carry their split.
        split_seed: Seed of those splits (17 in the protocol).
        preset: The dataset's preset, when known (Fed-ISIC2019's csv takes its domain and class names from it).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: A malformed layout, with the file and the fix.
    """
    _check_root(root)
    layout = detect_layout(root)
    if layout == "presplit":
        return _read_presplit(root)
    if layout == "presplit_filename_domains":
        return _read_presplit_filename_domains(root)
    if layout == "pacs_lists":
        return read_pacs_lists(root, preset)
    if layout == "domainnet_lists":
        return read_domainnet_lists(root)
    if layout == "fed_isic2019_csv":
        return read_fed_isic2019_csv(root, preset)
    if layout == "terra_annotations":
        return read_terra_annotations(root, test_fraction, split_seed)
    if layout == "unsplit_filename_domains":
        return _read_unsplit_filename_domains(root, test_fraction, split_seed)
    return _read_unsplit(root, test_fraction, split_seed)


# --- pre-split layouts ----------------------------------------------------------------------------


def _read_presplit(root: Path) -> DatasetIndex:
    dirs = {split: {p.name: p for p in subfolders(root / split)} for split in ("train", "test")}
    if set(dirs["train"]) != set(dirs["test"]):
        only_train = sorted(set(dirs["train"]) - set(dirs["test"]))
        only_test = sorted(set(dirs["test"]) - set(dirs["train"]))
        raise ValueError(
            f"The pre-split dataset '{root}' has different domains in train/ ({sorted(dirs['train'])}) and test/ "
            f"({sorted(dirs['test'])}): {only_train or 'none'} only in train/, {only_test or 'none'} only in test/. "
            "Every domain needs both a train/<domain> and a test/<domain> folder."
        )
    if not dirs["train"]:
        raise ValueError(f"The pre-split dataset '{root}' has no domain folders in train/ and test/.")
    found = {str(d): {c.name for c in subfolders(d)} for split in dirs.values() for d in split.values()}
    classes = sorted(set().union(*found.values()))
    warn_missing_classes(f"Pre-split dataset '{root}'", classes, found)
    splits = {
        domain: tuple(image_folder_samples(dirs[split][domain], classes) for split in ("train", "test"))
        for domain in dirs["train"]
    }
    return index_of(root, "presplit", classes, splits)


_PREFIX = re.compile(r"^([^_]+)_")


def _by_filename_domain(samples: list[Sample], where: Path) -> dict[str, list[Sample]]:
    grouped: dict[str, list[Sample]] = {}
    for path, label in samples:
        match = _PREFIX.match(path.name)
        if match is None:
            raise ValueError(
                f"Image '{path}' in '{where}' has no domain prefix: in this layout (ImageNet-R's, "
                "<class>/<domain>_<n>.jpg) every file name starts with its domain and an underscore. Rename it, or "
                "arrange the data as <domain>/<class>/<image>."
            )
        grouped.setdefault(match.group(1), []).append((path, label))
    return grouped


def _read_presplit_filename_domains(root: Path) -> DatasetIndex:
    found = {str(root / s): {c.name for c in subfolders(root / s)} for s in ("train", "test")}
    classes = sorted(set().union(*found.values()))
    warn_missing_classes(f"Pre-split dataset '{root}'", classes, found)
    train = _by_filename_domain(image_folder_samples(root / "train", classes), root / "train")
    test = _by_filename_domain(image_folder_samples(root / "test", classes), root / "test")
    splits = {d: (train.get(d, []), test.get(d, [])) for d in sorted(set(train) | set(test))}
    return index_of(root, "presplit_filename_domains", classes, splits)


# --- unsplit layouts: the authors' random_split ----------------------------------------------------


def _read_unsplit(root: Path, test_fraction: float, split_seed: int) -> DatasetIndex:
    domain_dirs = subfolders(root)
    if not domain_dirs:
        raise ValueError(
            f"Dataset root '{root}' has no domain folders; expected ROOT/<domain>/<class>/<image> (DomainBed's layout) "
            "or another layout of docs/protocol.md."
        )
    classes = {d.name: [c.name for c in subfolders(d)] for d in domain_dirs}
    first = domain_dirs[0].name
    for domain, names in classes.items():
        if names != classes[first]:
            only_here = sorted(set(names) - set(classes[first]))
            only_first = sorted(set(classes[first]) - set(names))
            raise ValueError(
                f"Class folders differ between domains: '{root / domain}' has {only_here or 'no extra classes'} that "
                f"'{root / first}' lacks, and lacks {only_first or 'none'} of its classes. Every domain must have the "
                "same class folders (create the missing ones, even empty, or rename them to agree)."
            )
    splits = {}
    for domain_dir in domain_dirs:
        samples = image_folder_samples(domain_dir, classes[first])
        if not samples:
            raise ValueError(
                f"Domain folder '{domain_dir}' has no images: expected <class>/<image> inside it, with image files "
                f"ending in one of {IMAGE_EXTENSIONS}. Add the images or remove the folder."
            )
        train, test = random_split_indices(len(samples), test_fraction, split_seed)
        splits[domain_dir.name] = ([samples[i] for i in sorted(train)], [samples[i] for i in sorted(test)])
    return index_of(root, "unsplit", classes[first], splits)


def _class_names_from_readme(root: Path) -> dict[str, str]:
    """ImageNet-R's README.txt maps WordNet ids to names (``n01443537 goldfish``); the authors rename by it."""
    readme = root / "README.txt"
    if not readme.is_file():
        return {}
    names = {}
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"n\d{8}", parts[0]):
            names[parts[0]] = parts[1]
    return names


def _read_unsplit_filename_domains(root: Path, test_fraction: float, split_seed: int) -> DatasetIndex:
    renamed = _class_names_from_readme(root)
    folders = sorted(subfolders(root), key=lambda p: renamed.get(p.name, p.name))  # ImageFolder order after renaming
    classes = [renamed.get(p.name, p.name) for p in folders]
    samples = []
    for label, folder in enumerate(folders):
        samples += [(path, label) for path, _ in image_folder_samples(root, [folder.name])]
    if not samples:
        raise ValueError(f"Dataset root '{root}' has no images in its class folders.")
    train_idx, test_idx = random_split_indices(len(samples), test_fraction, split_seed)
    train = _by_filename_domain([samples[i] for i in sorted(train_idx)], root)
    test = _by_filename_domain([samples[i] for i in sorted(test_idx)], root)
    splits = {d: (train.get(d, []), test.get(d, [])) for d in sorted(set(train) | set(test))}
    return index_of(root, "unsplit_filename_domains", classes, splits)
