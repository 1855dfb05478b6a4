"""lightning-score: train-then-merge for PyTorch Lightning.

Fine-tune one CLIP expert per data domain, snapshot each expert's task vector, and merge the experts
with SCORE (Subspace COnflict-Resolving mErging) into one model for domains none of them saw.

The public names are imported lazily, so that ``import lightning_score.merging`` (the pure-torch merge
core) never pulls in Lightning or open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_score._version import __version__

_LAZY_EXPORTS = {
    "TaskVector": "lightning_score.task_vector",
    "merge_task_vectors": "lightning_score.merging",
    "list_methods": "lightning_score.merging",
    "CLIPExpert": "lightning_score.expert",
    "DomainDataModule": "lightning_score.data",
    "ScoreMergeCallback": "lightning_score.callback",
    "MergeModule": "lightning_score.merge_module",
}

__all__ = [*_LAZY_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_score' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (lazily imported: not in the namespace until first used) and the module's dunders."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__") and name.endswith("__"))})
