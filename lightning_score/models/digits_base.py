"""The built-in offline benchmark's base model: a tiny CLIP pre-trained on upright digits (``builtin:digits``).

:func:`build_digits_base` pre-trains a tiny open_clip CLIP (``tiny-ViT-W96-L3`` by default) contrastively, image
against caption, on the *upright* pool of :mod:`lightning_score.data.digits` only (mildly augmented by small
shifts and scalings, never rotated), with a short Lightning fit. Its zero-shot accuracy is high on ``rot0`` and
falls with the angle, which is what the experts then fix. The weights are written as a safetensors file in the
cache (atomically, under an inter-process lock, reproducible from their seed) and loaded like any user's file:
``pretrained="builtin:digits"`` resolves to it, through the built-in registry
(:mod:`lightning_score.data.builtin`) in which this module registers it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from lightning_score.data.builtin import register_base
from lightning_score.data.digits import DATA_VERSION, DIGIT_NAMES, load_pool, materialise_rotated_digits
from lightning_score.models.factory import _without_root_records, build_clip, save_clip_weights
from lightning_score.models.schedule import warmup_cosine
from lightning_score.models.templates import load_templates
from lightning_score.utilities.files import cache_key, cache_lock, cache_root
from lightning_score.utilities.progress import LogTrainingProgress

__all__ = ["BASE_DEFAULTS", "build_digits_base"]

log = logging.getLogger(__name__)

BASE_VERSION = 1
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


def _quiet_random_init() -> contextlib.AbstractContextManager[None]:
    """Hide open_clip's "No pretrained weights loaded … initialized randomly" warning: here it is on purpose."""
    return _without_root_records("initialized randomly")


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

    @override
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

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    @override
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
        progress_bar: Show Lightning's progress bar on a terminal (elsewhere, and without it: a log line every 10 %
            of the steps or every minute, on this module's logger).

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
            bar = progress_bar and sys.stderr.isatty()  # a bar draws only on a terminal; elsewhere: lines
            what = f"pre-training the offline digits base ({settings['model_name']})"
            lines = [] if bar else [LogTrainingProgress(what, log.info)]
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
                    enable_progress_bar=bar,
                    callbacks=lines,
                    default_root_dir=scratch,
                )
                trainer.fit(module, train_dataloaders=loader)
        model = clip.model.cpu().eval()
        save_clip_weights(
            model,
            path,
            model_name=settings["model_name"],
            metadata={"built_by": f"{__name__}.build_digits_base", "settings": json.dumps(settings)},
        )
        log.info(
            f"Offline digits base ({settings['model_name']}, {settings['steps']} steps) pre-trained in "
            f"{time.perf_counter() - start:.1f} s and saved to '{path}'."
        )
    return path


register_base("digits", build_digits_base)
