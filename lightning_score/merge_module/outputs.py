"""What a prepared MergeModule writes: its merged weights file (open_clip) and an export in any backbone's format.

:func:`save_merged` writes the whole open_clip CLIP with the merged image encoder, loadable as
``pretrained=<file>``. :func:`export_merged` writes θ₀ + α·τ of the backbone's own model in its library's own
format with a model card (:func:`~lightning_score.models.export.export_model`): onto a copy of the base (θ₀), not
of the module, so an export is the merge exactly as ``use_alpha`` loads it, whatever the module holds now.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import lightning_score.merge_module.records as records
from lightning_score.models.export import export_model
from lightning_score.models.factory import save_clip_weights
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.strategies import is_sharded

MergeModule = Any  # lightning_score.merge_module.MergeModule, which calls these (not imported here: no cycle)

__all__ = ["export_merged", "save_merged"]


def _check_prepared(module: MergeModule, action: str) -> None:
    if module.mode == "ensemble":
        raise ValueError("An ensemble is T models, not one set of weights: there is nothing to save as a merge.")
    if not module._prepared:
        raise RuntimeError(
            f"MergeModule(mode='{module.mode}') has not been prepared, so its image encoder still holds the "
            f"pre-trained weights: run it through a Trainer (trainer.test, or `lightning-score merge`) or call "
            f"setup() before {action}()."
        )


def save_merged(module: MergeModule, path: str | Path) -> Path:
    """Write the whole open_clip CLIP with its merged image encoder, loadable as ``pretrained=path``.

    The header records the merge (method, options, α, inputs) as JSON under ``lightning_score_merge``
    (:func:`~lightning_score.merge_module.records.merged_file_header`).

    Raises:
        ValueError: ``mode="ensemble"`` (T models, not one set of weights), or a backbone other than open_clip
            (:func:`export_merged` writes those).
        RuntimeError: Nothing is prepared yet: the image encoder still holds θ₀, not a merge.
    """
    _check_prepared(module, "save_merged")
    if module.backbone.name != "open_clip":
        raise ValueError(
            f"save_merged writes open_clip weights files; a '{module.backbone.name}' model is written in its own "
            "library's format by MergeModule.export(folder) (`lightning-score merge --export FOLDER`)."
        )
    alpha = module._numeric_alpha() if module.mode == "expert" else module.current_alpha
    header = records.merged_file_header(module._record(), module.base_model, alpha, module.task_vector_paths)
    return save_clip_weights(module.clip, path, model_name=module.model_name, metadata=header)


def _what_to_apply(module: MergeModule) -> tuple[TaskVector, float]:
    """The task vector and α whose θ₀ + α·τ is the module's model (zero-shot: nothing)."""
    if module.mode == "zeroshot":
        return TaskVector({}, {"base_model": module.base_model}), 1.0
    if module.mode == "expert":
        return module._inputs().task_vectors[0], module._numeric_alpha()
    if module.merged is None or module.current_alpha is None:
        raise RuntimeError(
            "This MergeModule holds merged weights but not the merge τ* (it was restored with load_from_checkpoint): "
            "export a module that merged in this process (`lightning-score merge --export FOLDER`)."
        )
    return module.merged, module.current_alpha


def _base_model(module: MergeModule) -> torch.nn.Module:
    """The library's own model holding θ₀ (a copy on CPU: the module is not changed)."""
    if is_sharded(module.image_encoder):
        raise ValueError(
            "MergeModule.export runs on an unsharded module: after an FSDP run, export from one process "
            "(`lightning-score merge --export` without an FSDP strategy)."
        )
    clip = copy.deepcopy(module.clip).to("cpu")
    clip.visual.load_state_dict(module._inputs().pretrained)
    return module.backbone.library_model(clip)


def export_merged(
    module: MergeModule,
    directory: str | Path,
    *,
    overwrite: bool = False,
    test_accuracies: Mapping[str, float] | None = None,
) -> Path:
    """Write the module's model in its backbone's own format with a model card, loadable without lightning-score.

    open_clip: ``open_clip.create_model("local-dir:<dir>")``; transformers: ``CLIPModel.from_pretrained(dir)``;
    timm: ``timm.create_model("local-dir:<dir>", pretrained=True)`` (see :mod:`lightning_score.models.export`).
    The zero-shot head is written beside it; the card records the method, its options, α, the experts, the base's
    fingerprint and ``test_accuracies``.

    Args:
        module: A prepared MergeModule (mode ``merge``, ``expert`` or ``zeroshot``).
        directory: The export folder (built under a temporary name, then renamed).
        overwrite: Replace an existing non-empty folder (once the new one is complete).
        test_accuracies: Test domain → accuracy, for the card (``lightning-score merge`` gives its test's).

    Raises:
        ValueError: ``mode="ensemble"``; a sharded module.
        RuntimeError: Not prepared; or restored from a checkpoint without τ*.
        FileExistsError: ``directory`` exists and is not empty, without ``overwrite``.
    """
    _check_prepared(module, "export")
    task_vector, alpha = _what_to_apply(module)
    card: dict[str, Any] = {"test_accuracies": dict(test_accuracies or {}), "base_model": module.base_model}
    resolved = module.resolved_method
    if module.mode == "merge" and resolved is not None:  # the experts: the merge's record of its inputs
        card["options"] = {k: v for k, v in resolved.options.items() if k not in resolved.statistics}
    else:
        card.update(method=module.mode, options={})
        paths = module.task_vector_paths if module.mode == "expert" else []  # zero-shot: no experts applied
        card["experts"] = [{"name": p.stem, "path": str(p)} for p in paths]
    return export_model(
        _base_model(module),
        task_vector,
        directory,
        alpha=alpha,
        model_name=module.model_name,
        head=module.head,
        card=card,
        overwrite=overwrite,
    )
