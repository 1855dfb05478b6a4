"""Shared test settings: no hub lookups, deterministic seeds, one temporary cache for the whole session.

The session cache means the quick digits base and the rotated-digits folder are built once, whichever
test asks first, and nothing is written to the user's ~/.cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"


QUICK_BASE = {"model_name": "tiny-ViT-W64-L2", "steps": 200, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20}
"""A base pre-trained in a few seconds (the default build takes about a minute): ~0.88 zero-shot upright."""


@pytest.fixture(scope="session", autouse=True)
def lightning_score_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $LIGHTNING_SCORE_CACHE at a session-wide temporary folder."""
    path = tmp_path_factory.getbasetemp() / "lightning-score-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_SCORE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def quick_base_settings() -> dict:
    """The settings of the quick base (``build_digits_base`` arguments)."""
    return dict(QUICK_BASE)


@pytest.fixture(scope="session")
def quick_base(lightning_score_cache: Path) -> Path:
    """The quick base's weights file."""
    from lightning_score.data import digits

    return digits.build_digits_base(**QUICK_BASE, progress_bar=False)
