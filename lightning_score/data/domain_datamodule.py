"""Domain-generalization data for train-then-merge: every domain split as the SCORE paper splits it.

``root`` is read by :func:`~lightning_score.data.layouts.read_dataset`, which detects the layout (the
pre-split ``ROOT/train|test/<domain>/<class>/…``, PACS's and DomainNet's official lists, Fed-ISIC2019's csv,
TerraIncognita's annotation files, or DomainBed's unsplit ``ROOT/<domain>/<class>/…``) and applies the
authors' split. For one domain::

    train  = the authors' train split        # what an expert of this domain trains on (all of it by default)
    test   = the authors' test split         # what a model is tested on when this domain is a test domain
    val    = test minus any train image      # default validation data of a source domain (never trained on)
    with val_fraction > 0:  val = a seeded int(|train|·val_fraction) of train, fit = the rest of train

In a leave-one-domain-out fold, the sources' test splits are never scored (only the target's is), so they
serve as validation data (α search, ESM's proxy images) while experts keep their whole train split.
A dataset whose domains match a :mod:`preset <lightning_score.data.presets>` gets its prompt set as
:attr:`DomainDataModule.default_templates` (what ``templates="auto"`` picks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from typing_extensions import override

from lightning_score.data.builtin import builtin_name, get_builtin
from lightning_score.data.images import IMAGE_EXTENSIONS, ImageListDataset, Sample, check_images
from lightning_score.data.index import LAYOUTS, DatasetIndex
from lightning_score.data.layouts import read_dataset
from lightning_score.data.presets import DatasetPreset, detect_preset, get_preset
from lightning_score.data.splits import DomainSplit, split_domain

__all__ = ["IMAGE_EXTENSIONS", "DomainDataModule", "DomainSplit", "ImageListDataset"]

log = logging.getLogger(__name__)

_SPLITS = ("train", "fit", "val", "test")
_VERIFIED: set[tuple[Path, str]] = set()  # (root, domain) whose images were opened once in this process


class DomainDataModule(LightningDataModule):
    """Images of several domains, split as the SCORE paper splits them, for train-then-merge experiments.

    Args:
        root: The dataset folder in any layout of ``docs/protocol.md`` (auto-detected), or ``"builtin:digits"``
            for the built-in rotated-digits benchmark (materialised into the cache on first use).
        train_domains: The source domains: experts train on them, validation data comes from them. ``None``
            for test-only use.
        test_domains: The domains to test on, one test dataloader each, in this order; ``None`` means every
            domain not in ``train_domains``. A training domain may be listed: its test split is used.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and proxy loaders (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        val_fraction: 0 (the paper): experts train on their whole train split and validation data is the
            sources' test split. ``> 0``: that fraction of each source's train split is held out for validation
            instead (DomainBed's training-domain validation) and experts train on the rest.
        test_fraction: Test share where the split is seeded (unsplit folders, TerraIncognita's annotations);
            0.2 in the protocol. Lists, csv and pre-split folders carry their own split.
        split_seed: Seed of those splits and of the validation carve (17 in the SCORE paper).
        preset: The dataset preset (``pacs``, ``office_home``... see ``lightning_score.data.presets``),
            ``"auto"`` to detect it from the domain names, or ``"none"``.
        pin_memory: Pin host memory for faster GPU transfer; ``None`` pins when CUDA is available.
        verify_images: Open every image header of the used domains in ``setup`` (once per process), so an
            unreadable file fails early with its path (turn off for very large datasets).
        train_transform: Training preprocessing for a PIL image; default: the LightningModule's ``train_transform``.
        val_transform: Evaluation preprocessing; default: the LightningModule's ``val_transform``.

    Example:
        >>> dm = DomainDataModule("builtin:digits", train_domains=["rot30"], test_domains=["rot0", "rot30"])
        >>> dm.classnames[:3], dm.test_domains  # the first use writes the benchmark into the cache (seconds)
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
        val_fraction: float = 0.0,
        test_fraction: float = 0.2,
        split_seed: int = 17,
        preset: str = "auto",
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
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction} (0: validate on the test splits).")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction} (the protocol uses 0.2).")
        if preset not in ("auto", "none"):
            get_preset(preset)  # fails early on an unknown name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.preset_name = preset
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.verify_images = verify_images
        self.train_transform = train_transform
        self.val_transform = val_transform
        self._root_path: Path | None = None
        self._index: DatasetIndex | None = None
        self._splits: dict[str, DomainSplit] = {}

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
        return builtin_name(self.root)

    @property
    def root_path(self) -> Path:
        """The dataset folder (a built-in one is materialised into the cache on first access)."""
        if self._root_path is None:
            if self.builtin is None:
                self._root_path = Path(self.root).expanduser()
            else:
                self._root_path = Path(get_builtin(self.root).materialise())
        return self._root_path

    @property
    def preset(self) -> DatasetPreset | None:
        """The dataset's preset: the one named by ``preset``, or detected from the domain names (or ``None``)."""
        if self.preset_name == "none" or self.builtin is not None:
            return None
        if self.preset_name != "auto":
            return get_preset(self.preset_name)
        return detect_preset(self.index.domains)

    @property
    def index(self) -> DatasetIndex:
        """The dataset as read from disk: layout, classes, each domain's train and test images."""
        if self._index is None:
            named = get_preset(self.preset_name) if self.preset_name not in ("auto", "none") else None
            index = read_dataset(self.root_path, self.test_fraction, self.split_seed, named)
            for domain in (self._train_arg or []) + (self._test_arg or []):
                if domain not in index.domains:
                    raise ValueError(
                        f"Domain '{domain}' is not a domain of '{index.root}'; its domains are {list(index.domains)}. "
                        "Fix train_domains / test_domains."
                    )
            self._index = index
            self._warn_if_not_the_papers_split()
        return self._index

    def _warn_if_not_the_papers_split(self) -> None:
        preset = self.preset
        assert self._index is not None
        if preset is not None and self._index.layout not in preset.paper_layouts:
            rank_zero_warn(
                f"'{self._index.root}' looks like {preset.title}, read as layout '{self._index.layout}' "
                f"({LAYOUTS[self._index.layout]}); the SCORE paper splits {preset.title} by {preset.split}. "
                f"To match the paper, {preset.hint or 'use one of the layouts ' + str(preset.paper_layouts)}."
            )

    @property
    def layout(self) -> str:
        """The detected layout (``presplit``, ``pacs_lists``, ``unsplit``... see ``data/layouts.py``)."""
        return self.index.layout

    @property
    def domains(self) -> list[str]:
        """Every domain of the dataset, sorted."""
        return list(self.index.domains)

    @property
    def class_folders(self) -> list[str]:
        """The class names as the data gives them (folder names, mostly); label ``i`` is ``class_folders[i]``."""
        return list(self.index.classes)

    @property
    def classnames(self) -> list[str]:
        """Class names for prompts: :attr:`class_folders` with underscores as spaces."""
        return [c.replace("_", " ") for c in self.class_folders]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_folders)

    @property
    def train_domains(self) -> list[str]:
        """The training (source) domains (empty for test-only use)."""
        _ = self.index
        return list(self._train_arg or [])

    @property
    def test_domains(self) -> list[str]:
        """The test domains, in test-dataloader order (``test/<domain>/...`` metric names use them)."""
        if self._test_arg is not None:
            _ = self.index
            return list(self._test_arg)
        return [d for d in self.index.domains if d not in (self._train_arg or [])]

    @property
    def default_templates(self) -> str | None:
        """The prompt-template set of this dataset: the preset's (the authors' set), ``digits`` for the built-in."""
        if self.builtin is not None:
            return get_builtin(self.root).templates
        preset = self.preset
        return preset.templates if preset is not None else None

    # --- splits --------------------------------------------------------------------------------

    def domain_samples(self, domain: str) -> list[Sample]:
        """One domain's ``(path, label)`` images: its train split, then its test split (what :meth:`split` indexes)."""
        self._check_domain(domain)
        part = self.index.domains[domain]
        return list(part.train) + list(part.test)

    def _check_domain(self, domain: str) -> None:
        if domain not in self.index.domains:
            raise ValueError(
                f"Domain '{domain}' is not a domain of '{self.root_path}'; its domains are {self.domains}."
            )

    def split(self, domain: str) -> DomainSplit:
        """The fit/val/test positions of one domain in :meth:`domain_samples` (see the module docstring)."""
        self._check_domain(domain)
        if domain not in self._splits:
            self._splits[domain] = split_domain(self.index.domains[domain], self.val_fraction, self.split_seed)
        return self._splits[domain]

    def samples(self, domain: str, split: str) -> list[Sample]:
        """``(path, label)`` pairs of one domain's ``"train"`` (all of it), ``"fit"``, ``"val"`` or ``"test"`` split."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, not {split!r}.")
        if split == "train":
            self._check_domain(domain)
            return list(self.index.domains[domain].train)
        everything = self.domain_samples(domain)
        return [everything[i] for i in getattr(self.split(domain), split)]

    # --- Lightning hooks -----------------------------------------------------------------------

    @override
    def prepare_data(self) -> None:
        """Materialise a built-in dataset (runs on one process per node)."""
        _ = self.root_path

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and check the dataset, open every image header once, and take transforms from the LightningModule."""
        index = self.index
        used = list(dict.fromkeys(self.train_domains + self.test_domains))
        if self.verify_images:
            for domain in used:
                if (index.root, domain) not in _VERIFIED:
                    part = index.domains[domain]
                    unique = dict.fromkeys(part.train + part.test)  # PACS's test list repeats the train images
                    check_images(unique, f"domain '{domain}' of '{index.root}' ({index.layout})")
                    _VERIFIED.add((index.root, domain))
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.train_transform is None and getattr(module, "train_transform", None) is not None:
            self.train_transform = module.train_transform
        if self.val_transform is None and getattr(module, "val_transform", None) is not None:
            self.val_transform = module.val_transform
        preset = self.preset
        rank_zero_info(
            f"DomainDataModule: '{index.root}' ({preset.title + ', ' if preset else ''}{index.layout}: "
            f"{LAYOUTS[index.layout]}), {self.num_classes} classes; train on {self.train_domains or 'nothing'} "
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
        """One domain's split as a dataset of ``(image, label)``: ``"fit"`` and ``"train"`` use the train transform."""
        return ImageListDataset(self.samples(domain, split), self._transform(split in ("fit", "train")))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, persistent: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """The training domains' fit parts, shuffled."""
        if not self.train_domains:
            raise ValueError("No train_domains were given; set train_domains to train (e.g. train_domains=['photo']).")
        dataset = ConcatDataset([self.dataset(d, "fit") for d in self.train_domains])
        return self._loader(dataset, self.batch_size, shuffle=True, persistent=True)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The training domains' validation parts, as one loader (an empty list when there are none)."""
        parts = [self.dataset(d, "val") for d in self.train_domains if self.split(d).val]
        if not parts:
            return []
        return self._loader(ConcatDataset(parts), self.eval_batch_size, shuffle=False, persistent=True)

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test domain (its test split), in :attr:`test_domains` order."""
        if not self.test_domains:
            raise ValueError(
                "There are no test domains: every domain is a training domain. List the domains to test on in "
                "test_domains (a training domain's test split may be used)."
            )
        return [self._loader(self.dataset(d, "test"), self.eval_batch_size, shuffle=False) for d in self.test_domains]

    @override
    def predict_dataloader(self) -> list[DataLoader]:
        """The test loaders (predictions come out per test domain)."""
        return self.test_dataloader()

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> DataLoader:
        """Unlabelled images of a source domain's validation split, e.g. ESM's proxy data for a merge.

        The images are a seeded sample (``split_seed``) of the domain's validation split, so the same for
        every call and never an image an expert trained on; batches are image tensors only, with the
        evaluation transform. A test domain that is not a training domain is refused (target data).

        Args:
            domain: The source domain to draw from.
            num_images: How many images (fewer if the validation split is smaller; a warning says so).
            batch_size: Loader batch size (default: ``num_images``, one batch).
        """
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}.")
        if domain in self.test_domains and domain not in self.train_domains:
            raise ValueError(
                f"Domain '{domain}' is a test domain and not a training domain: its images would leak the target "
                "into the merge. Draw proxy images from the sources (train_domains) only."
            )
        samples = self.samples(domain, "val")
        if not samples:
            raise ValueError(f"Domain '{domain}' has no validation images to draw proxy images from.")
        if len(samples) < num_images:
            log.warning("Domain '%s' has only %d validation images; using all as proxy data.", domain, len(samples))
        chosen = torch.randperm(len(samples), generator=torch.Generator().manual_seed(self.split_seed))[:num_images]
        chosen_samples = [samples[i] for i in sorted(chosen.tolist())]
        dataset = ImageListDataset(chosen_samples, self._transform(False), with_labels=False)
        return self._loader(dataset, batch_size or len(dataset), shuffle=False)
