"""Domain-generalisation data in DomainBed's folder layout: ``ROOT/<domain>/<class>/<image>``.

Every domain is split 80/20 into train/test with a fixed seed (17 by default, as in the SCORE paper); a
validation split is carved from the *training* domains' train parts only. For one domain of n images::

    perm = randperm(n, seed=split_seed)      # the same permutation for every domain of n images
    test = perm[:⌊n·test_fraction⌋]          # never depends on val_fraction or on the other domains
    val  = next ⌊(n − |test|)·val_fraction⌋  # used only when the domain is a training domain
    fit  = the rest                          # what training sees

A training domain's test part is still available: list it in ``test_domains`` to test an expert on its
own domain ("own expert" rows), on images it never saw.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset

__all__ = ["BUILTIN_ROOTS", "IMAGE_EXTENSIONS", "DomainDataModule", "DomainSplit", "ImageListDataset"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# root="builtin:<name>" -> (module, function() -> Path of a DomainBed-layout folder, template set)
BUILTIN_ROOTS = {"digits": ("lightning_score.data.digits", "materialise_rotated_digits", "digits")}
_BUILTIN_PREFIX = "builtin:"

Sample = tuple[Path, int]


@dataclass(frozen=True)
class DomainSplit:
    """Indices into one domain's sorted sample list."""

    fit: list[int]
    """Training images (what an expert of this domain trains on)."""
    val: list[int]
    """Validation images (used when the domain is a training domain)."""
    test: list[int]
    """The held-out test images."""


def split_domain(n: int, test_fraction: float, val_fraction: float, seed: int) -> DomainSplit:
    """Split ``n`` samples into fit/val/test with a seeded permutation (see the module docstring)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(n * test_fraction)
    n_val = int((n - n_test) * val_fraction)
    return DomainSplit(fit=perm[n_test + n_val :], val=perm[n_test : n_test + n_val], test=perm[:n_test])


class ImageListDataset(Dataset):
    """Images from a list of ``(path, label)``, read as RGB and transformed.

    Args:
        samples: The files and their labels.
        transform: Applied to each PIL image.
        with_labels: Return ``(image, label)``; with ``False`` only the image (unlabelled proxy data).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any], with_labels: bool = True):
        self.samples = list(samples)
        self.transform = transform
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:
            raise ValueError(f"Cannot read image '{path}' ({error}). Remove or replace the file.") from error
        image = self.transform(image)
        return (image, label) if self.with_labels else image


@dataclass(frozen=True)
class _Scan:
    root: Path
    domains: list[str]
    class_folders: list[str]
    samples: dict[str, list[Sample]]
    presplit_train: dict[str, int] | None = None
    """For the pre-split layout: how many of each domain's samples (the first ones) are its train split."""


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_presplit(root: Path) -> bool:
    """Whether ``root`` holds the pre-split layout ``ROOT/train/<domain>/<class>/…`` + ``ROOT/test/…``."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def scan_presplit_root(root: Path) -> _Scan:
    """Read the pre-split layout: each domain's samples are its train images, then its test images."""
    train, test = scan_domain_root(root / "train"), scan_domain_root(root / "test")
    if train.domains != test.domains:
        raise ValueError(
            f"The pre-split dataset '{root}' has different domains in train/ ({train.domains}) and test/ "
            f"({test.domains}); every domain needs both a train/<domain> and a test/<domain> folder."
        )
    if train.class_folders != test.class_folders:
        raise ValueError(
            f"The pre-split dataset '{root}' has different class folders in train/ and test/: "
            f"{sorted(set(train.class_folders) ^ set(test.class_folders))}. Every domain must have the same class "
            "folders in both (create the missing ones, even empty)."
        )
    samples = {d: train.samples[d] + test.samples[d] for d in train.domains}
    counts = {d: len(train.samples[d]) for d in train.domains}
    return _Scan(root, train.domains, train.class_folders, samples, presplit_train=counts)


def scan_domain_root(root: Path) -> _Scan:
    """Read a DomainBed-layout folder; raise one clear error for each kind of bad layout."""
    if not root.exists():
        raise FileNotFoundError(
            f"Dataset root '{root}' does not exist. Point `root` at a folder laid out as ROOT/<domain>/<class>/<image> "
            "(DomainBed's layout), or use root='builtin:digits' for the built-in offline benchmark."
        )
    if not root.is_dir():
        raise ValueError(
            f"Dataset root '{root}' is a file; it must be a folder laid out as ROOT/<domain>/<class>/<image>."
        )
    domain_dirs = _subfolders(root)
    if not domain_dirs:
        raise ValueError(f"Dataset root '{root}' has no domain folders; expected ROOT/<domain>/<class>/<image>.")
    classes: dict[str, list[str]] = {}
    samples: dict[str, list[Sample]] = {}
    for domain_dir in domain_dirs:
        class_dirs = _subfolders(domain_dir)
        classes[domain_dir.name] = [c.name for c in class_dirs]
        samples[domain_dir.name] = [(image, label) for label, c in enumerate(class_dirs) for image in _images(c)]
        if not samples[domain_dir.name]:
            raise ValueError(
                f"Domain folder '{domain_dir}' has no images: expected <class>/<image> inside it, with image files "
                f"ending in one of {IMAGE_EXTENSIONS}. Add the images or remove the folder."
            )
        for c in class_dirs:
            if not _images(c):
                log.warning("Class folder '%s' has no images; that class has no examples in this domain.", c)
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
    return _Scan(root=root, domains=[d.name for d in domain_dirs], class_folders=classes[first], samples=samples)


class DomainDataModule(LightningDataModule):
    """Images of several domains in DomainBed's layout, split for train-then-merge experiments.

    Args:
        root: The dataset folder, ``ROOT/<domain>/<class>/<image>``; or ``"builtin:digits"`` for the built-in
            rotated-digits benchmark (materialised into the cache on first use).
        train_domains: The domains to train on (their fit parts) and validate on (their val parts). ``None``
            for test-only use.
        test_domains: The domains to test on, one test dataloader each, in this order; ``None`` means every
            domain not in ``train_domains``. A training domain may be listed: its held-out test split is used.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and proxy loaders (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of each training domain's train part held out for validation (0 for none).
        test_fraction: Fraction of every domain held out for testing (0.2 in the protocol).
        split_seed: Seed of the per-domain split permutation (17 in the SCORE paper).
        pin_memory: Pin host memory for faster GPU transfer; ``None`` pins when CUDA is available.
        verify_images: Open every image header of the used domains in ``setup``, so an unreadable file fails
            early with its path (turn off for very large datasets).
        train_transform: Training preprocessing for a PIL image; default: the LightningModule's ``train_transform``.
        val_transform: Evaluation preprocessing; default: the LightningModule's ``val_transform``.

    Example:
        >>> dm = DomainDataModule("builtin:digits", train_domains=["rot30"], test_domains=["rot0", "rot30"])
        >>> dm.classnames[:3], dm.test_domains  # doctest: +SKIP
        (['eight', 'five', 'four'], ['rot0', 'rot30'])
    """

    def __init__(
        self,
        root: str,
        train_domains: list[str] | None = None,
        test_domains: list[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 17,
        pin_memory: bool | None = None,
        verify_images: bool = True,
        train_transform: Callable[[Image.Image], Any] | None = None,
        val_transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform", "val_transform"])
        self.root = str(root)
        self._train_arg = self._domain_list(train_domains, "train_domains")
        self._test_arg = self._domain_list(test_domains, "test_domains")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size ({batch_size}) and eval_batch_size ({eval_batch_size}) must be at least 1.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction} (the protocol uses 0.2).")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.verify_images = verify_images
        self.train_transform = train_transform
        self.val_transform = val_transform
        self._root_path: Path | None = None
        self._scan: _Scan | None = None
        self._splits: dict[str, DomainSplit] = {}
        self._verified = False

    @staticmethod
    def _domain_list(domains: Sequence[str] | str | None, name: str) -> list[str] | None:
        if domains is None:
            return None
        domains = [domains] if isinstance(domains, str) else list(domains)
        if len(set(domains)) != len(domains):
            raise ValueError(f"{name} lists a domain twice: {domains}.")
        return domains

    # --- where the data is ----------------------------------------------------------------------

    @property
    def builtin(self) -> str | None:
        """The built-in dataset's name if ``root`` is ``"builtin:<name>"``."""
        return self.root[len(_BUILTIN_PREFIX) :] if self.root.startswith(_BUILTIN_PREFIX) else None

    @property
    def root_path(self) -> Path:
        """The dataset folder (a built-in one is materialised into the cache on first access)."""
        if self._root_path is None:
            name = self.builtin
            if name is None:
                self._root_path = Path(self.root).expanduser()
            elif name not in BUILTIN_ROOTS:
                known = [_BUILTIN_PREFIX + n for n in BUILTIN_ROOTS]
                raise ValueError(f"Unknown built-in dataset {self.root!r}; available: {known}.")
            else:
                module, function, _ = BUILTIN_ROOTS[name]
                self._root_path = Path(getattr(importlib.import_module(module), function)())
        return self._root_path

    def _scanned(self) -> _Scan:
        if self._scan is None:
            root = self.root_path
            scan = scan_presplit_root(root) if is_presplit(root) else scan_domain_root(root)
            for domain in (self._train_arg or []) + (self._test_arg or []):
                if domain not in scan.domains:
                    raise ValueError(
                        f"Domain '{domain}' is not a folder of '{scan.root}'; its domains are {scan.domains}. "
                        "Fix train_domains / test_domains."
                    )
            self._scan = scan
        return self._scan

    @property
    def domains(self) -> list[str]:
        """Every domain folder of the dataset, sorted."""
        return list(self._scanned().domains)

    @property
    def class_folders(self) -> list[str]:
        """The class folder names, sorted; label ``i`` is ``class_folders[i]``."""
        return list(self._scanned().class_folders)

    @property
    def classnames(self) -> list[str]:
        """Class names for prompts: the folder names with underscores as spaces."""
        return [c.replace("_", " ") for c in self.class_folders]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_folders)

    @property
    def train_domains(self) -> list[str]:
        """The training domains (empty for test-only use)."""
        self._scanned()
        return list(self._train_arg or [])

    @property
    def test_domains(self) -> list[str]:
        """The test domains, in test-dataloader order (``test/<domain>/...`` metric names use them)."""
        scan = self._scanned()
        if self._test_arg is not None:
            return list(self._test_arg)
        return [d for d in scan.domains if d not in (self._train_arg or [])]

    @property
    def default_templates(self) -> str | None:
        """The prompt-template set written for this dataset, if known (``"digits"`` for the built-in one)."""
        name = self.builtin
        return BUILTIN_ROOTS[name][2] if name in BUILTIN_ROOTS else None

    # --- splits --------------------------------------------------------------------------------

    def split(self, domain: str) -> DomainSplit:
        """The fit/val/test indices of one domain (into :meth:`samples` order)."""
        scan = self._scanned()
        if domain not in scan.domains:
            raise ValueError(f"Domain '{domain}' is not a folder of '{scan.root}'; its domains are {scan.domains}.")
        if domain not in self._splits and scan.presplit_train is not None:
            n_train, n = scan.presplit_train[domain], len(scan.samples[domain])
            part = split_domain(n_train, 0.0, self.val_fraction, self.split_seed)  # val carved from train only
            self._splits[domain] = DomainSplit(fit=sorted(part.fit), val=part.val, test=list(range(n_train, n)))
        if domain not in self._splits:
            self._splits[domain] = split_domain(
                len(scan.samples[domain]), self.test_fraction, self.val_fraction, self.split_seed
            )
        return self._splits[domain]

    def samples(self, domain: str, split: str) -> list[Sample]:
        """``(path, label)`` pairs of one domain's ``"fit"``, ``"val"`` or ``"test"`` split."""
        if split not in ("fit", "val", "test"):
            raise ValueError(f"split must be 'fit', 'val' or 'test', not {split!r}.")
        indices = getattr(self.split(domain), split)
        all_samples = self._scanned().samples[domain]
        return [all_samples[i] for i in indices]

    # --- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Materialise a built-in dataset (runs on one process per node)."""
        _ = self.root_path

    def setup(self, stage: str | None = None) -> None:
        """Scan and validate the folder, check images, and take transforms from the LightningModule."""
        scan = self._scanned()
        used = list(dict.fromkeys(self.train_domains + self.test_domains))
        for domain in used:
            split = self.split(domain)
            if domain in self.train_domains and not split.fit:
                raise ValueError(
                    f"Domain '{domain}' ({len(scan.samples[domain])} images in '{scan.root / domain}') is too small to "
                    "train on after holding out test and validation images; add images or lower the fractions."
                )
            if domain in self.test_domains and not split.test:
                raise ValueError(
                    f"Domain '{domain}' ({len(scan.samples[domain])} images in '{scan.root / domain}') is too small to "
                    f"hold out a test split of {self.test_fraction:.0%}; add images."
                )
        if self.verify_images and not self._verified:
            for domain in used:
                for path, _ in scan.samples[domain]:
                    try:
                        with Image.open(path) as image:
                            image.size  # noqa: B018 - parses the header
                    except Exception as error:
                        raise ValueError(
                            f"Cannot read image '{path}' ({error}). Remove or replace the file "
                            "(or pass verify_images=False to skip this check)."
                        ) from error
            self._verified = True
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.train_transform is None and getattr(module, "train_transform", None) is not None:
            self.train_transform = module.train_transform
        if self.val_transform is None and getattr(module, "val_transform", None) is not None:
            self.val_transform = module.val_transform
        rank_zero_info(
            f"DomainDataModule: '{scan.root}', {self.num_classes} classes; train on {self.train_domains or 'nothing'} "
            f"({sum(len(self.split(d).fit) for d in self.train_domains)} images), test on {self.test_domains}."
        )

    # --- datasets and loaders ------------------------------------------------------------------

    def _transform(self, train: bool) -> Callable[[Image.Image], Any]:
        transform = self.train_transform if train else self.val_transform
        if transform is None:
            raise ValueError(
                "DomainDataModule has no image transforms: pass train_transform/val_transform, or use it with a "
                "CLIPClassifier/CLIPExpert, whose open_clip preprocessing it takes in setup()."
            )
        return transform

    def dataset(self, domain: str, split: str) -> ImageListDataset:
        """One domain's split as a dataset of ``(image, label)``: ``"fit"`` uses the train transform."""
        return ImageListDataset(self.samples(domain, split), self._transform(split == "fit"))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, persistent: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training domains' fit parts, shuffled."""
        if not self.train_domains:
            raise ValueError("No train_domains were given; set train_domains to train (e.g. train_domains=['photo']).")
        dataset = ConcatDataset([self.dataset(d, "fit") for d in self.train_domains])
        return self._loader(dataset, self.batch_size, shuffle=True, persistent=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The training domains' validation parts (an empty list when there are none)."""
        parts = [self.dataset(d, "val") for d in self.train_domains if self.split(d).val]
        if not parts:
            return []
        return self._loader(ConcatDataset(parts), self.eval_batch_size, shuffle=False, persistent=True)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test domain (its held-out test split), in :attr:`test_domains` order."""
        if not self.test_domains:
            raise ValueError(
                "There are no test domains: every domain is a training domain. List the domains to test on in "
                "test_domains (a training domain's held-out test split may be used)."
            )
        return [self._loader(self.dataset(d, "test"), self.eval_batch_size, shuffle=False) for d in self.test_domains]

    def predict_dataloader(self) -> list[DataLoader]:
        """The test loaders (predictions come out per test domain)."""
        return self.test_dataloader()

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> DataLoader:
        """A few unlabelled images of one domain's *training* (fit) split, e.g. as proxy data for a merge method.

        Batches are image tensors only (no labels), with the evaluation transform, always the same images.
        Pass source (training) domains only: a target domain's images would leak into the merge.

        Args:
            domain: The domain to draw from.
            num_images: How many images (fewer if the fit split is smaller; a warning says so).
            batch_size: Loader batch size (default: ``num_images``, one batch).
        """
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}.")
        samples = self.samples(domain, "fit")
        if len(samples) < num_images:
            log.warning("Domain '%s' has only %d training images; using all as proxy data.", domain, len(samples))
        dataset = ImageListDataset(samples[:num_images], self._transform(False), with_labels=False)
        return self._loader(dataset, batch_size or len(dataset), shuffle=False)
