"""The built-in offline benchmark: rotated digits, and the tiny "pre-trained CLIP" every expert starts from.

Data (after Rotated MNIST, Ghifary et al. 2015, as used in DomainBed): the 1,797 8x8 handwritten digits
that scikit-learn ships inside its package, so nothing is downloaded.

1. A seeded permutation sets aside ``POOL_SIZE`` digits as the *pre-training pool*; no domain uses them.
2. The other digits appear in every domain, rotated by 0, 15, 30, 45, 60 and 75 degrees (domains ``rot0`` …
   ``rot75``). Each is upsampled to 24 px, centred on a black 32 px canvas, rotated, and saved as an RGB PNG
   ``domains/rot<angle>/<number word>/<digit id>.png``. Class names are number words, so prompts read "a photo
   of the digit seven.".

   Every domain holds the same digit ids in the same file order, and :class:`DomainDataModule` splits every
   domain of n images with the same seeded permutation, so a digit is in the test split of every domain or
   of none: no expert ever trains on a rotation of a digit that another domain tests on.

Base model: :func:`build_digits_base` pre-trains a tiny open_clip CLIP (``tiny-ViT-W96-L3`` by default)
contrastively, image against caption, on the *upright* pool only (mildly augmented by small shifts and
scalings, never rotated), with a short Lightning fit. Its zero-shot accuracy is high on ``rot0`` and falls
with the angle, which is what the experts then fix. The weights are written as a safetensors file and
loaded like any user's file (``pretrained="builtin:digits"`` resolves to it).

Both artefacts are cached under ``$LIGHTNING_SCORE_CACHE`` (default ``~/.cache/lightning_score``), written
atomically under an inter-process lock, and reproducible from their seeds.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
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
    "build_digits_base",
    "digits_dataset_folder",
    "load_pool",
    "materialise_rotated_digits",
    "render_digit",
]

log = logging.getLogger(__name__)

DATA_VERSION = 1
BASE_VERSION = 1
ROTATIONS = (0, 15, 30, 45, 60, 75)
DOMAINS = tuple(f"rot{angle}" for angle in ROTATIONS)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POOL_SIZE = 497
IMAGE_SIZE = 32
_DIGIT_SIZE = 24
_DATA_SEED = 0

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


def render_digit(digit: np.ndarray, angle: float) -> Image.Image:
    """One 8x8 scikit-learn digit (values 0-16) as a 32 px RGB image rotated ``angle`` degrees anticlockwise."""
    small = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    offset = (IMAGE_SIZE - _DIGIT_SIZE) // 2
    canvas.paste(small.resize((_DIGIT_SIZE, _DIGIT_SIZE), Image.Resampling.BICUBIC), (offset, offset))
    return canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0).convert("RGB")


def digits_dataset_folder() -> Path:
    """Where the materialised benchmark lives: ``<cache>/datasets/rotated-digits-v<version>``."""
    return cache_root() / "datasets" / f"rotated-digits-v{DATA_VERSION}"


def _write_benchmark(folder: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(_DATA_SEED).permutation(len(digits.images))
    pool, rest = order[:POOL_SIZE], np.sort(order[POOL_SIZE:])
    for index in pool:
        target = folder / "pool" / DIGIT_NAMES[digits.target[index]]
        target.mkdir(parents=True, exist_ok=True)
        render_digit(digits.images[index], 0).save(target / f"{index:04d}.png")
    for domain, angle in zip(DOMAINS, ROTATIONS, strict=True):
        for name in DIGIT_NAMES:
            (folder / "domains" / domain / name).mkdir(parents=True, exist_ok=True)
        for index in rest:
            image = render_digit(digits.images[index], angle)
            image.save(folder / "domains" / domain / DIGIT_NAMES[digits.target[index]] / f"{index:04d}.png")
    (folder / "README.txt").write_text(
        "Rotated digits, built by lightning_score.data.digits from scikit-learn's 8x8 digits.\n"
        f"domains/: DomainBed layout, {len(rest)} digits per domain, rotations {list(ROTATIONS)} degrees.\n"
        f"pool/: {len(pool)} upright digits set aside for pre-training the base model; no domain uses them.\n"
    )


def materialise_rotated_digits() -> Path:
    """Write the rotated-digits benchmark into the cache (once) and return its DomainBed root.

    Returns:
        ``<cache>/datasets/rotated-digits-v1/domains``, holding ``rot0`` … ``rot75``.
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
