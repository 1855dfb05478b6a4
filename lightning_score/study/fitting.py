"""The study's fine-tuning: one expert per domain and seed, and one pooled multi-source model per target and seed.

Both are :class:`~lightning_score.CLIPExpert` fits under ``Trainer.fit`` with a
:class:`~lightning_score.ScoreMergeCallback` that writes the model's task vector, exactly as a user fits an
expert by hand. The pooled model (DomainBed's ERM, the SCORE authors' multi-task run) is fine-tuned with
the same settings on the union of the target's source domains, never on the target; it is then evaluated
like an expert. Each fit is seeded (data order and augmentation): seed ``s`` of domain ``d`` is the same
model whichever study or target asks for it.

On several devices (``devices × num_nodes > 1``) each fit is one DDP fit across all of them (Lightning's
``ddp`` strategy; the processes are the study's own, see :mod:`.distributed`). ``expert.batch_size`` stays
the GLOBAL batch: each process loads ``batch_size / (devices × num_nodes)`` images per step, so the
optimisation (global batch, learning rate, steps) is the protocol's whatever the device count, and a kept
expert is reused by a study on another number of devices. That the device count divides the batch is
checked with the rest of the configuration, before any work (:mod:`.checks`).

Under SLURM, Lightning's requeue (``SLURMEnvironment(auto_requeue=True)``: on SIGUSR1 it saves
``hpc_ckpt_<n>.ckpt`` in the Trainer's ``default_root_dir`` and runs ``scontrol requeue``; SLURM then stops the
job with SIGTERM) works with the study: each fit has a folder of its own (``logs/seed-<s>/fits/<name>``), so the
requeued job's rerun resumes each fit from its own checkpoint only, and a finished fit's checkpoints are removed.
A fit stopped by a signal writes no task vector (the callback writes one only when training ends).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_score.callback import ScoreMergeCallback
from lightning_score.data import DomainDataModule
from lightning_score.expert import CLIPExpert
from lightning_score.study.config import StudyConfig
from lightning_score.study.stages import Fit

__all__ = [
    "QUIET_TRAINER",
    "FitResult",
    "MakeData",
    "StopPredictingOnSigterm",
    "fit_task_vector",
    "quiet_lightning",
    "remove_hpc_checkpoints",
]

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


def remove_hpc_checkpoints(folder: Path) -> None:
    """Remove the checkpoints Lightning's SLURM requeue saved in ``folder`` (once nothing is left to resume)."""
    for path in folder.glob("hpc_ckpt_*.ckpt"):
        path.unlink(missing_ok=True)


class StopPredictingOnSigterm(Callback):
    """The study's evaluations stop on SIGTERM at a batch end, as Lightning's fits and tests do (predictions don't).

    An evaluation has nothing to resume (each finished row is kept), so the checkpoint SLURM's requeue saves during
    one is removed when it ends: a later ``predict`` would otherwise restore it (Lightning resumes from an HPC
    checkpoint of ``default_root_dir`` by itself under SLURM).
    """

    def on_predict_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """Stop once SIGTERM came (Lightning's handler only records it during ``predict``)."""
        if trainer.received_sigterm:
            raise SIGTERMException

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove an HPC checkpoint saved during this evaluation."""
        remove_hpc_checkpoints(Path(trainer.default_root_dir))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """The same when the evaluation is stopped."""
        remove_hpc_checkpoints(Path(trainer.default_root_dir))


MakeData = Callable[[list[str], int], DomainDataModule]
"""``(train_domains, per-process batch size) -> DomainDataModule``: the study's data for a fit."""


@dataclass(frozen=True)
class FitResult:
    """What a fit reports.

    Attributes:
        seconds: Wall time of ``Trainer.fit``.
        steps: Optimiser steps taken.
        train_domains: The domains it trained on.
    """

    seconds: float
    steps: int
    train_domains: list[str]


def fit_task_vector(
    fit: Fit,
    config: StudyConfig,
    path: Path,
    make_data: MakeData,
    record: dict[str, Any],
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Fine-tune one CLIPExpert on the fit's domains and write its task vector to ``path``.

    Seeded with the fit's seed (data order and augmentation): the same fit, the same task vector, bit for bit.

    Args:
        fit: The expert (of one domain) or pooled model (the other domains of its target's fold) and its seed.
        config: The study's resolved configuration: the model (``model_name``, ``pretrained``, ``templates``),
            ``expert`` (learning rate, steps, the GLOBAL batch size, precision...), ``accelerator``, ``devices``
            and ``num_nodes`` (one DDP process each), ``domains`` (a pooled model's sources) and ``output_dir``
            (the training curve, CSV, goes to ``logs/seed-<s>/fits/<name>``).
        path: The task-vector file to write.
        make_data: ``(train_domains, per-process batch size) -> DomainDataModule``.
        record: Kept in the task vector's metadata as ``expert_config``: what a rerun compares.
        callbacks: More callbacks for the fit's Trainer (the study's progress lines).
    """
    settings, world_size = config.expert, config.world_size
    assert settings is not None and config.domains is not None, "fit_task_vector takes the study's resolved config"
    train_domains = fit.train_domains(config.domains)
    log_dir = Path(config.output_dir) / "logs" / f"seed-{fit.seed}"
    fit_dir = log_dir / "fits" / fit.name  # the CSV curve, and SLURM's requeue checkpoint of this fit only
    L.seed_everything(fit.seed, verbose=False)
    module = CLIPExpert(
        config.model_name,
        config.pretrained,
        templates=config.templates,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        lora=settings.lora,
        backbone=config.backbone,
        backbone_options=dict(config.backbone_options or {}),
    )
    callback = ScoreMergeCallback(
        dirpath=path.parent,
        filename=path.name,
        name=fit.name,
        domain=fit.domain if fit.kind == "expert" else None,
        metadata={"expert_config": record},
    )
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if world_size > 1 else "auto",
        precision=settings.precision,
        max_steps=settings.max_steps,
        max_epochs=settings.max_epochs if settings.max_steps < 0 else None,
        gradient_clip_val=settings.gradient_clip_val,
        limit_val_batches=0,  # the study tests every model on held-out data itself; no validation passes
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        callbacks=[callback, *callbacks],
        logger=CSVLogger(log_dir, name="fits", version=fit.name),
        default_root_dir=fit_dir,
        **QUIET_TRAINER,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=make_data(train_domains, settings.batch_size // world_size))
    remove_hpc_checkpoints(fit_dir)  # the task vector is written: nothing left to resume
    return FitResult(seconds=time.perf_counter() - started, steps=trainer.global_step, train_domains=train_domains)
