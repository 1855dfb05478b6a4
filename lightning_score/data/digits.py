"""The built-in offline benchmark's data: rotated digits, rendered from scikit-learn's digits into the cache.

Data (after Rotated MNIST, Ghifary et al. 2015, as used in DomainBed): the 1,797 8x8 handwritten digits
that scikit-learn ships inside its package, so nothing is downloaded. A seeded permutation divides them:

1. ``POOL_SIZE`` digits are the *pre-training pool*, rendered upright; no domain uses them.
2. ``TEST_DIGITS`` digits are the *test digits*: every domain's test split renders each of them once, so a
   domain has 1,000 test images of 1,000 different digits (a cell's 95 % interval is about ±2-3 points).
3. The rest are the *train digits*: every domain's train split renders each of them ``TRAIN_RENDERINGS``
   times. No digit is in the train split of one domain and the test split of another, and no test image is
   a copy of a training image.

Domains ``rot0`` … ``rot75`` rotate by 0, 15, 30, 45, 60 and 75 degrees. Each rendering draws its own small
random scale (digit height 20-26 px), shift (±2 px) and stroke thickness (thinner, as is, thicker) from a
seed of (split, domain, digit, rendering), then rotates by the domain's angle on a black 32 px canvas. The
files are written in the pre-split layout ``domains/train/<domain>/<class>/<digit>-<k>.png`` and
``domains/test/<domain>/<class>/<digit>.png``, which :class:`~lightning_score.data.DomainDataModule` reads
as is. Class names are number words, so prompts read "a photo of the digit seven.".

The upright pool (:func:`load_pool`) is what :mod:`lightning_score.models.digits_base` pre-trains the tiny base
CLIP on (``pretrained="builtin:digits"``). The benchmark is cached under ``$LIGHTNING_SCORE_CACHE`` (default
``~/.cache/lightning_score``), written atomically under an inter-process lock, and reproducible from its seed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageFilter
from torch import Tensor

from lightning_score.utilities.files import atomic_publish_dir, cache_lock, cache_root

__all__ = [
    "DATA_VERSION",
    "DIGIT_NAMES",
    "DOMAINS",
    "POOL_SIZE",
    "ROTATIONS",
    "TEST_DIGITS",
    "TRAIN_RENDERINGS",
    "digit_partition",
    "digits_dataset_folder",
    "load_pool",
    "materialise_rotated_digits",
    "render_digit",
    "rendering_jitter",
]

log = logging.getLogger(__name__)

DATA_VERSION = 2
ROTATIONS = (0, 15, 30, 45, 60, 75)
DOMAINS = tuple(f"rot{angle}" for angle in ROTATIONS)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POOL_SIZE = 450
TEST_DIGITS = 1000
TRAIN_RENDERINGS = 4
IMAGE_SIZE = 32
_DIGIT_SIZE = 24
_DATA_SEED = 0
_SPLIT_CODES = {"train": 1, "test": 2}


# --- data -----------------------------------------------------------------------------------------


def render_digit(
    digit: np.ndarray, angle: float, *, scale: float = 1.0, shift: tuple[int, int] = (0, 0), thickness: int = 0
) -> Image.Image:
    """One 8x8 scikit-learn digit (values 0-16) as a 32 px RGB image rotated ``angle`` degrees anticlockwise.

    Args:
        digit: The 8x8 digit.
        angle: Rotation in degrees, anticlockwise, about the canvas centre.
        scale: The digit's height relative to 24 px.
        shift: Offset (x, y) in pixels from the centred position, before rotation.
        thickness: -1 thins the strokes (half a 3x3 minimum filter), +1 thickens them (half a maximum filter).
    """
    small = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    size = round(_DIGIT_SIZE * scale)
    glyph = small.resize((size, size), Image.Resampling.BICUBIC)
    if thickness:  # half of a 3x3 max (min) filter: strokes about one pixel thicker (thinner)
        filtered = glyph.filter(ImageFilter.MaxFilter(3) if thickness > 0 else ImageFilter.MinFilter(3))
        glyph = Image.blend(glyph, filtered, 0.5)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    offset = (IMAGE_SIZE - size) // 2
    canvas.paste(glyph, (offset + shift[0], offset + shift[1]))
    return canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0).convert("RGB")


def rendering_jitter(split: str, domain_index: int, digit: int, rendering: int) -> dict[str, Any]:
    """The small random scale, shift and thickness of one rendering (seeded by all four arguments).

    Returns:
        Keyword arguments of :func:`render_digit`: ``scale`` in [20/24, 26/24], ``shift`` in [-2, 2]², and
        ``thickness`` in {-1, 0, 1}.
    """
    rng = np.random.default_rng([_DATA_SEED, _SPLIT_CODES[split], domain_index, digit, rendering])
    height = int(rng.integers(20, 27))
    shift = (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
    return {"scale": height / _DIGIT_SIZE, "shift": shift, "thickness": int(rng.integers(-1, 2))}


def digit_partition(count: int = 1797) -> dict[str, np.ndarray]:
    """Which scikit-learn digits are the pre-training pool, the test digits and the train digits (sorted ids)."""
    order = np.random.RandomState(_DATA_SEED).permutation(count)
    pool, test = order[:POOL_SIZE], order[POOL_SIZE : POOL_SIZE + TEST_DIGITS]
    return {"pool": np.sort(pool), "test": np.sort(test), "train": np.sort(order[POOL_SIZE + TEST_DIGITS :])}


def digits_dataset_folder() -> Path:
    """Where the materialised benchmark lives: ``<cache>/datasets/rotated-digits-v<version>``."""
    return cache_root() / "datasets" / f"rotated-digits-v{DATA_VERSION}"


def _write_benchmark(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    parts = digit_partition(len(digits.images))
    for index in parts["pool"]:
        target = folder / "pool" / DIGIT_NAMES[digits.target[index]]
        target.mkdir(parents=True, exist_ok=True)
        render_digit(digits.images[index], 0).save(target / f"{index:04d}.png")
    renderings = {"train": TRAIN_RENDERINGS, "test": 1}
    for split in ("train", "test"):
        for domain_index, (domain, angle) in enumerate(zip(DOMAINS, ROTATIONS, strict=True)):
            for name in DIGIT_NAMES:
                (folder / "domains" / split / domain / name).mkdir(parents=True, exist_ok=True)
            for index in parts[split]:
                for k in range(renderings[split]):
                    jitter = rendering_jitter(split, domain_index, int(index), k)
                    file = f"{index:04d}-{k}.png" if split == "train" else f"{index:04d}.png"
                    image = render_digit(digits.images[index], angle, **jitter)
                    image.save(folder / "domains" / split / domain / DIGIT_NAMES[digits.target[index]] / file)
    (folder / "README.txt").write_text(
        "Rotated digits, built by lightning_score.data.digits from scikit-learn's 8x8 digits.\n"
        f"domains/: pre-split layout train/<domain>/<class>/ and test/<domain>/<class>/, rotations {list(ROTATIONS)}"
        f" degrees; per domain {len(parts['test'])} test images (one per test digit) and "
        f"{len(parts['train']) * TRAIN_RENDERINGS} train images ({TRAIN_RENDERINGS} renderings of each of "
        f"{len(parts['train'])} train digits), each rendering with its own small scale, shift and thickness.\n"
        f"pool/: {len(parts['pool'])} upright digits set aside for pre-training the base model; no domain uses them.\n"
    )


def materialise_rotated_digits() -> Path:
    """Write the rotated-digits benchmark into the cache (once) and return its root, in the pre-split layout.

    Returns:
        ``<cache>/datasets/rotated-digits-v2/domains``, holding ``train/rot0`` … ``test/rot75``.
    """
    folder = digits_dataset_folder()
    if not (folder / "domains").is_dir():
        with cache_lock(folder.name):
            if not (folder / "domains").is_dir():
                start = time.perf_counter()
                atomic_publish_dir(folder, _write_benchmark)
                rank_zero_info(f"Rotated digits written to '{folder}' in {time.perf_counter() - start:.1f} s.")
    return folder / "domains"


def load_pool(transform: Any) -> tuple[Tensor, Tensor]:
    """The upright pre-training pool as ``(images [N, 3, H, W], labels [N])``, each image through ``transform``."""
    pool = materialise_rotated_digits().parent / "pool"
    images, labels = [], []
    for label, name in enumerate(DIGIT_NAMES):
        for path in sorted((pool / name).glob("*.png")):
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)
