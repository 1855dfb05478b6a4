"""The built-in offline benchmark: rotated digits, and the tiny "pre-trained CLIP" every expert starts from.

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

Base model: :func:`build_digits_base` pre-trains a tiny open_clip CLIP (``tiny-ViT-W96-L3`` by default)
contrastively, image against caption, on the *upright* pool only (mildly augmented by small shifts and
scalings, never rotated), with a short Lightning fit. Its zero-shot accuracy is high on ``rot0`` and falls
with the angle, which is what the experts then fix. The weights are written as a safetensors file and
loaded like any user's file (``pretrained="builtin:digits"`` resolves to it).

Both artefacts are cached under ``$LIGHTNING_SCORE_CACHE`` (default ``~/.cache/lightning_score``), written
atomically under an inter-process lock, and reproducible from their seeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_score.models import build_clip, load_templates, save_clip_weights
from lightning_score.models.cache import atomic_publish_dir, cache_key, cache_lock, cache_root
from lightning_score.models.schedule import warmup_cosine

__all__ = [
    "BASE_DEFAULTS",
    "DIGIT_NAMES",
    "DOMAINS",
    "POOL_SIZE",
    "ROTATIONS",
    "TEST_DIGITS",
    "TRAIN_RENDERINGS",
    "build_digits_base",
    "digit_partition",
    "digits_dataset_folder",
    "load_pool",
    "materialise_rotated_digits",
    "render_digit",
    "rendering_jitter",
]

log = logging.getLogger(__name__)

DATA_VERSION = 2
BASE_VERSION = 1
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

BASE_DEFAULTS: dict[str, Any] = {
    "model_name": "tiny-ViT-W96-L3",
    "steps": 400,
    "batch_size": 128,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 40,
    "seed": 0,
}
"""What ``pretrained="builtin:digits"`` builds (``model_name`` is the one asked for)."""


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


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded … initialized randomly" warning: here it is on purpose.

    open_clip logs it through the root logger; a filter drops that one record, and a NullHandler keeps
    ``logging.warning`` from configuring the root logger as a side effect.
    """
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if placeholder is not None:
            root.removeHandler(placeholder)


# --- base model -----------------------------------------------------------------------------------


def _shift_and_scale(images: Tensor, max_shift: float = 0.1, max_scale: float = 0.1) -> Tensor:
    """Mild augmentation without rotation: per-image random scaling and translation (border padded)."""
    n = images.shape[0]
    scale = 1.0 + (torch.rand(n, device=images.device) * 2 - 1) * max_scale
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (torch.rand(n, 2, device=images.device) * 2 - 1) * max_shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="border")


class UprightContrastivePretraining(LightningModule):
    """CLIP's contrastive objective on captioned upright digits, with duplicate captions merged.

    A batch has B images of 10 classes. Each class gets one caption (a random template with its number
    word), so images of the same class share their positive caption: the image→text loss is a
    cross-entropy over the 10 captions, and the text→image loss spreads each caption's target evenly over
    its images. Both towers and the logit scale train (the scale clamped at 100, as in CLIP).

    Args:
        model: The open_clip model to train.
        tokenizer: Its tokenizer.
        templates: Caption templates with one ``{}``.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        templates: list[str],
        lr: float,
        weight_decay: float,
        warmup_steps: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.templates = templates
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        images = _shift_and_scale(images)
        choice = torch.randint(len(self.templates), (len(DIGIT_NAMES),)).tolist()
        captions = [self.templates[t].format(name) for t, name in zip(choice, DIGIT_NAMES, strict=True)]
        image_features = F.normalize(self.model.encode_image(images), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)), dim=-1)
        logits = self.model.logit_scale.exp() * image_features @ text_features.T  # [B, 10]
        image_to_text = F.cross_entropy(logits, labels)
        targets = F.one_hot(labels, len(DIGIT_NAMES)).float().T  # [10, B]
        present = targets.sum(dim=1) > 0
        targets = targets / targets.sum(dim=1, keepdim=True).clamp(min=1)
        text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1)[present].mean()
        loss = (image_to_text + text_to_image) / 2
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, self.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_digits_base(
    model_name: str | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup_steps: int | None = None,
    seed: int | None = None,
    accelerator: str = "cpu",
    progress_bar: bool = True,
) -> Path:
    """Pre-train (once, cached) the offline base CLIP on the upright pool and return its weights file.

    Unset arguments take :data:`BASE_DEFAULTS` (400 steps of batch 128 at lr 1e-3 on ``tiny-ViT-W96-L3``: about
    a minute on 2 CPU cores). The file name is a hash of all settings, so a quicker base for tests (say
    ``steps=60``) is cached separately.

    Args:
        model_name: The open_clip architecture (one of the tiny ones, in practice).
        steps: Optimiser steps.
        batch_size: Images per step, drawn with replacement from the pool.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        seed: Seeds the initial weights, the sampling and the augmentation.
        accelerator: Lightning accelerator for the fit (``"cpu"`` keeps the result device-independent).
        progress_bar: Show Lightning's progress bar.

    Returns:
        ``<cache>/weights/digits-base-<model>-<hash>.safetensors``; load it with
        ``build_clip(model_name, pretrained=path)`` (or ``pretrained="builtin:digits"`` for the defaults).
    """
    given = {
        "model_name": model_name,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "seed": seed,
    }
    settings = {**BASE_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    key = cache_key(BASE_VERSION, DATA_VERSION, settings)
    path = cache_root() / "weights" / f"digits-base-{settings['model_name']}-{key}.safetensors"
    if path.is_file():
        return path
    with cache_lock(path.stem):
        if path.is_file():
            return path
        materialise_rotated_digits()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings["seed"])
            with _quiet_random_init():
                clip = build_clip(settings["model_name"], pretrained=None)
            clip.model.train()
            images, labels = load_pool(clip.val_transform)
            sampler = RandomSampler(
                range(len(labels)),
                replacement=True,
                num_samples=settings["steps"] * settings["batch_size"],
                generator=torch.Generator().manual_seed(settings["seed"]),
            )
            loader = DataLoader(TensorDataset(images, labels), batch_size=settings["batch_size"], sampler=sampler)
            module = UprightContrastivePretraining(
                clip.model,
                clip.tokenizer,
                load_templates("digits"),
                lr=settings["lr"],
                weight_decay=settings["weight_decay"],
                warmup_steps=settings["warmup_steps"],
            )
            with tempfile.TemporaryDirectory() as scratch:
                trainer = Trainer(
                    max_steps=settings["steps"],
                    max_epochs=1,  # the sampler draws exactly steps x batch_size images: one epoch (bar: "Epoch 0/0")
                    accelerator=accelerator,
                    devices=1,
                    gradient_clip_val=1.0,
                    logger=False,
                    enable_checkpointing=False,
                    enable_model_summary=False,
                    enable_progress_bar=progress_bar,
                    default_root_dir=scratch,
                )
                trainer.fit(module, train_dataloaders=loader)
        model = clip.model.cpu().eval()
        save_clip_weights(
            model,
            path,
            model_name=settings["model_name"],
            metadata={"built_by": "lightning_score.data.digits.build_digits_base", "settings": json.dumps(settings)},
        )
        rank_zero_info(
            f"Offline digits base ({settings['model_name']}, {settings['steps']} steps) pre-trained in "
            f"{time.perf_counter() - start:.1f} s and saved to '{path}'."
        )
    return path
