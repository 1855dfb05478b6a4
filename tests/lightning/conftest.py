"""Three quick digits experts (rot0, rot30, rot60) with task vectors written by ScoreMergeCallback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from lightning_score import CLIPExpert, DomainDataModule, ScoreMergeCallback
from tests.conftest import QUICK_BASE

MODEL = QUICK_BASE["model_name"]
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
EXPERT_DOMAINS = ("rot0", "rot30", "rot60")


def digits(**kwargs: object) -> DomainDataModule:
    kwargs.setdefault("batch_size", 64)
    return DomainDataModule("builtin:digits", num_workers=0, **kwargs)


@pytest.fixture(scope="session")
def expert_task_vectors(quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """domain -> task-vector file, each expert fine-tuned 25 steps from the quick base."""
    folder = tmp_path_factory.mktemp("task_vectors")
    paths = {}
    for domain in EXPERT_DOMAINS:
        expert = CLIPExpert(MODEL, str(quick_base), templates="digits", lr=1e-3, warmup_steps=3)
        callback = ScoreMergeCallback(dirpath=folder)
        trainer = L.Trainer(max_steps=25, gradient_clip_val=1.0, num_sanity_val_steps=0, callbacks=[callback], **QUIET)
        trainer.fit(expert, datamodule=digits(train_domains=[domain]))
        paths[domain] = callback.task_vector_path
    return paths
