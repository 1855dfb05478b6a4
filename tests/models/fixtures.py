"""Fixtures shared by tests/models, tests/data and tests/test_expert.py (imported into each).

One temporary cache for the whole session, so the quick digits base and the rotated-digits folder
are built once, whichever test asks first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

QUICK_BASE = {"model_name": "tiny-ViT-W64-L2", "steps": 200, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20}
"""A base pre-trained in a few seconds (the default build takes about a minute): ~0.88 zero-shot upright."""


@pytest.fixture(scope="session", autouse=True)
def lightning_score_cache(tmp_path_factory: pytest.TempPathFactory):
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
