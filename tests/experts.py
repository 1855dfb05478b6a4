"""The quick digits setting most Lightning-layer tests share: a base pre-trained in seconds, experts of it, data.

``quick_base`` and ``expert_task_vectors`` (session fixtures, in ``tests/conftest.py``) build them once per run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_score import CLIPExpert, DomainDataModule, ScoreMergeCallback

QUICK_BASE = {"model_name": "tiny-ViT-W64-L2", "steps": 200, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20}
"""A base pre-trained in a few seconds (the default build takes about a minute): ~0.88 zero-shot upright."""

MODEL = QUICK_BASE["model_name"]
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
EXPERT_DOMAINS = ("rot0", "rot30", "rot60")


def digits(**kwargs: object) -> DomainDataModule:
    """The built-in digits, in the main process, batches of 64 unless set."""
    kwargs.setdefault("batch_size", 64)
    return DomainDataModule("builtin:digits", num_workers=0, **kwargs)


def fit_experts(base: Path, folder: Path) -> dict[str, Path]:
    """domain -> task-vector file, each expert fine-tuned 25 steps from ``base`` (written by ScoreMergeCallback)."""
    paths = {}
    for domain in EXPERT_DOMAINS:
        expert = CLIPExpert(MODEL, str(base), templates="digits", lr=1e-3, warmup_steps=3)
        callback = ScoreMergeCallback(dirpath=folder)
        trainer = L.Trainer(max_steps=25, gradient_clip_val=1.0, num_sanity_val_steps=0, callbacks=[callback], **QUIET)
        trainer.fit(expert, datamodule=digits(train_domains=[domain]))
        paths[domain] = callback.task_vector_path
    return paths
