"""The tests' shared fixtures: the quick digits base and experts of it (``conftest.py`` at the root sets the rest)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.experts import QUICK_BASE, fit_experts


@pytest.fixture(scope="session")
def quick_base_settings() -> dict:
    """The settings of the quick base (``build_digits_base`` arguments)."""
    return dict(QUICK_BASE)


@pytest.fixture(scope="session")
def quick_base(lightning_score_cache: Path) -> Path:
    """The quick base's weights file."""
    from lightning_score.models.digits_base import build_digits_base

    return build_digits_base(**QUICK_BASE, progress_bar=False)


@pytest.fixture
def quick_builtin(quick_base: Path, quick_base_settings: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """``builtin:digits`` resolving to the quick base (built once per run) instead of the minute-long default.

    Returns the quick base's model name (the architecture to pass with ``pretrained="builtin:digits"``).
    """
    from lightning_score.models import digits_base

    for key, value in quick_base_settings.items():
        monkeypatch.setitem(digits_base.BASE_DEFAULTS, key, value)
    return quick_base_settings["model_name"]


@pytest.fixture(scope="session")
def expert_task_vectors(quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """domain -> task-vector file, each expert fine-tuned 25 steps from the quick base (rot0, rot30, rot60)."""
    return fit_experts(quick_base, tmp_path_factory.mktemp("task_vectors"))


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (``tmp_path`` is private to its owner, root), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ls-shared-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)
