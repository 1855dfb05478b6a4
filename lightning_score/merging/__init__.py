"""The merge core: pure torch (+ safetensors), no Lightning, no open_clip, no data.

``merge_task_vectors(task_vectors, method="score", ...)`` walks the keys of T task vectors one at a
time and hands each key's T slices to a registered method. One file per method family; importing this
package registers every method.
"""

# importing a method module registers it; the order is the order of list_methods()
from lightning_score.merging import score, tsv, iso, ties, magmax, pcb, arithmetic, esm  # noqa: F401  # isort: skip
from lightning_score.merging import dare, breadcrumbs, randmix, model_stock, cart, wudi, regmean, fisher  # noqa: F401  # isort: skip
from lightning_score.merging.engine import is_matrix_key, merge_task_vectors, resolve_device
from lightning_score.merging.factors import FactorCache, KeyFactors
from lightning_score.merging.registry import KeyMerger, KeyStream, MethodSpec, get_method, list_methods, register_method

__all__ = [
    "FactorCache",
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
