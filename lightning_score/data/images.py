"""Image files: listing them as torchvision's ``ImageFolder`` does, and reading them as a dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageListDataset", "Sample", "check_images", "image_folder_samples", "subfolders"]

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)
"""The file endings ``ImageFolder`` reads (case-insensitive)."""

Sample = tuple[Path, int]
"""One image: its file and its label."""


def subfolders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` sorted by name, hidden ones (``.x``, ``__x``) left out."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))), key=lambda p: p.name
    )


def image_folder_samples(folder: Path, classes: Sequence[str]) -> list[Sample]:
    """The images of ``folder/<class>/…`` labelled by their class's index in ``classes``, in ImageFolder's order.

    The order is torchvision's: classes by sorted name, then each class folder walked recursively with
    sorted sub-folders and file names; only :data:`IMAGE_EXTENSIONS`. A class with no folder here has no
    images (no error).
    """
    class_to_idx = {name: index for index, name in enumerate(classes)}
    found = make_dataset(str(folder), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    return [(Path(path), label) for path, label in found]


def check_images(samples: Iterable[Sample], where: str) -> None:
    """Open every image header once, so an unreadable or missing file fails early with its path.

    Args:
        samples: The images to check.
        where: Where the images were listed (a folder or a list file), for the message.
    """
    for path, _ in samples:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - parses the header
        except Exception as error:
            raise ValueError(
                f"Cannot read image '{path}' (listed by {where}): {error}. Remove or replace the file (or pass "
                "verify_images=False to skip this check)."
            ) from error


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
