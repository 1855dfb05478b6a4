"""The study's fine-tuning: one expert per domain and seed, and one pooled multi-source model per target and seed.

Both are :class:`~lightning_score.CLIPExpert` fits under ``Trainer.fit`` with a
:class:`~lightning_score.ScoreMergeCallback` that writes the model's task vector, exactly as a user fits an
expert by hand. The pooled model (DomainBed's ERM, the SCORE authors' multi-task run) is fine-tuned with
the same settings on the union of the target's source domains, never on the target; it is then evaluated
like an expert. Each fit is seeded (data order and augmentation): seed ``s`` of domain ``d`` is the same
model whichever study or target asks for it.

On several devices (``devices × num_nodes > 1``) each fit is one DDP fit across all of them (Lightning's
``ddp`` strategy; the processes are the study's own, see :mod:`.distributed`). ``settings.batch_size`` stays
the GLOBAL batch: each process loads ``batch_size / (devices × num_nodes)`` images per step, so the
optimisation (global batch, learning rate, steps) is the protocol's whatever the device count, and a kept
expert is reused by a study on another number of devices.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_score.callback import ScoreMergeCallback
from lightning_score.data import DomainDataModule
from lightning_score.expert import CLIPExpert
from lightning_score.study.config import ExpertSettings

__all__ = ["QUIET_TRAINER", "FitResult", "fit_task_vector", "quiet_lightning"]

QUIET_TRAINER = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's per-run chatter (devices, seeds, tips) out of the study's own progress output."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning_score")
    previous = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning_score.study.runner").setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            warnings.filterwarnings("ignore", message=".*never reaches its peak.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # a redone fit's old curve
            yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


class FitResult(dict):
    """What a fit reports: ``seconds``, ``steps``, ``train_domains``."""


def fit_task_vector(
    *,
    path: Path,
    name: str,
    domain: str | None,
    train_domains: Sequence[str],
    make_data: Callable[[list[str], int], DomainDataModule],
    model_name: str,
    pretrained: str | None,
    templates: str,
    settings: ExpertSettings,
    seed: int,
    config: dict[str, Any],
    accelerator: str,
    log_dir: Path,
    devices: int = 1,
    num_nodes: int = 1,
) -> FitResult:
    """Fine-tune one CLIPExpert on ``train_domains`` and write its task vector to ``path``.

    Args:
        path: The task-vector file to write.
        name: The model's name (``rot30``, ``pooled-rot30``), in its metadata and log folder.
        domain: The expert's domain (ESM draws its proxy images from it); ``None`` for a pooled model.
        train_domains: What it trains on: one domain (an expert) or the target's sources (pooled).
        make_data: ``(train_domains, batch_size) -> DomainDataModule``.
        model_name: open_clip architecture.
        pretrained: The base weights.
        templates: The head's template set.
        settings: Learning rate, steps, batch size, precision...
        seed: Seeds data order and augmentation.
        config: Recorded in the task vector's metadata (``expert_config``): what a rerun compares.
        accelerator: Lightning accelerator.
        log_dir: Where the training curve (CSV) goes.
        devices: Devices per node (one DDP process each).
        num_nodes: Nodes.
    """
    world_size = devices * num_nodes
    if settings.batch_size % world_size:
        raise ValueError(f"expert.batch_size={settings.batch_size} (the global batch) must be divisible by devices × "
                         f"num_nodes = {world_size}.")  # fmt: skip
    L.seed_everything(seed, verbose=False)
    module = CLIPExpert(
        model_name,
        pretrained,
        templates=templates,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
    )
    callback = ScoreMergeCallback(
        dirpath=path.parent, filename=path.name, name=name, domain=domain, metadata={"expert_config": config}
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if world_size > 1 else "auto",
        precision=settings.precision,
        max_steps=settings.max_steps,
        max_epochs=settings.max_epochs if settings.max_steps < 0 else None,
        gradient_clip_val=settings.gradient_clip_val,
        limit_val_batches=0,  # the study tests every model on held-out data itself; no validation passes
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        callbacks=[callback],
        logger=CSVLogger(log_dir, name="fits", version=name),
        default_root_dir=log_dir,
        **QUIET_TRAINER,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=make_data(list(train_domains), settings.batch_size // world_size))
    return FitResult(
        seconds=time.perf_counter() - started, steps=trainer.global_step, train_domains=list(train_domains)
    )
