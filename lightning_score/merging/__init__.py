"""The merge core: pure torch (+ safetensors), no Lightning, no open_clip, no data.

``merge_task_vectors(task_vectors, method="score", ...)`` walks the keys of T task vectors one at a
time and hands each key's T slices to a registered method. One file per method family in ``methods/``;
importing this package registers every method.
"""

from lightning_score.merging import methods  # noqa: F401  (registers every method)
from lightning_score.merging.engine import merge_task_vectors
from lightning_score.merging.factor_cache import FactorCache
from lightning_score.merging.key_factors import KeyFactors
from lightning_score.merging.keys import is_matrix_key, resolve_device
from lightning_score.merging.registry import (
    Factorizations,
    KeyMerger,
    KeyStream,
    MethodSpec,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "FactorCache",
    "Factorizations",
    "KeyFactors",
    "KeyMerger",
    "KeyStream",
    "MethodSpec",
    "get_method",
    "is_matrix_key",
    "list_methods",
    "merge_task_vectors",
    "register_method",
    "resolve_device",
]
