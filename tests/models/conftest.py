"""The session-wide temporary cache and quick digits base (see tests/models/fixtures.py)."""

from tests.models.fixtures import lightning_score_cache, quick_base, quick_base_settings

__all__ = ["lightning_score_cache", "quick_base", "quick_base_settings"]
