"""Settings for every test and docstring example: no hub lookups, deterministic seeds, one temporary cache.

The session cache means the quick digits base and the rotated-digits folder are built once, whichever test (or
example) asks first, and nothing is written to the user's ~/.cache. ``tests/conftest.py`` adds the tests' own
fixtures.
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
    """Torch's version, whether CUDA is there, and the thread count (merges' last bits depend on it)."""
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()}"


@pytest.fixture(scope="session", autouse=True)
def lightning_score_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $LIGHTNING_SCORE_CACHE at a session-wide temporary folder."""
    path = tmp_path_factory.getbasetemp() / "lightning-score-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_SCORE_CACHE", str(path))
        yield path
