"""``ScoreMergeCallback(merge_with=...)``: merge the new expert with earlier ones, and test the merge in its place.

The callback's optional last steps, in the order they run:

1. :func:`check_experts` (``setup``) and :func:`check_same_base` (once θ₀ is known): the earlier experts' files
   are task vectors made from the same pre-trained weights, before any training;
2. :func:`merge_expert` (``on_train_end``, rank zero): the new expert merged with them, written beside it;
3. :func:`find_merge` and :func:`swap_in` (``on_test_start``): θ₀ + τ* (:func:`merged_weights`) in the module for
   ``trainer.test``, from the files the fit wrote (found again from its receipt in another process).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_score.callback.records import Selection
from lightning_score.callback.sharded import keep_own, load_selected
from lightning_score.callback.snapshot import read_snapshot
from lightning_score.merging import merge_task_vectors
from lightning_score.task_vector import TaskVector

__all__ = ["check_experts", "check_same_base", "find_merge", "merge_expert", "merged_weights", "swap_in"]


def check_experts(paths: Sequence[Path]) -> None:
    """Open every file as a task vector (the tensors are not read).

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not a task vector (each message names the file and the fix).
    """
    for path in paths:
        TaskVector.load(path)


def check_same_base(paths: Sequence[Path], fingerprint: str, base_model: str | None = None) -> None:
    """Refuse experts whose recorded base fingerprint is not ``fingerprint`` (θ₀ of the fit); unrecorded ones pass.

    Args:
        paths: The earlier experts' task-vector files.
        fingerprint: The fingerprint of this fit's θ₀.
        base_model: The fitted module's base-model label, for the message.

    Raises:
        ValueError: An expert was made from other pre-trained weights.
    """
    for other in paths:
        tv = TaskVector.load(other)
        other_fp = tv.base_fingerprint
        if other_fp and other_fp != fingerprint:
            raise ValueError(
                f"'{other}' was made from different pre-trained weights than the model being fitted: it was "
                f"fine-tuned from {tv.base_model or 'an unrecorded base model'}, this fit starts from "
                f"{base_model or 'other weights'} (base fingerprints {other_fp[:20]}… vs {fingerprint[:20]}…). "
                "merge_with takes experts fine-tuned from the same base model."
            )


def merge_expert(
    task_vector: Path,
    paths: Sequence[Path],
    method: str,
    alpha: float,
    options: dict[str, Any],
    device: torch.device,
) -> Path:
    """Merge the new expert with the earlier ones and write ``merged-<method>.safetensors`` beside it.

    Args:
        task_vector: The new expert's task-vector file (it comes first in the merge).
        paths: The earlier experts' files.
        method: The merge method (see :func:`lightning_score.merging.list_methods`).
        alpha: The scaling coefficient α of the merged update.
        options: The method's options.
        device: Where to compute the merge.

    Returns:
        The merged task vector's file.
    """
    inputs = [TaskVector.load(task_vector), *(TaskVector.load(path) for path in paths)]
    merged = merge_task_vectors(inputs, method, alpha=alpha, device=device, **options)
    path = merged.save(task_vector.with_name(f"merged-{method}.safetensors"))
    rank_zero_info(f"ScoreMergeCallback: merged {len(inputs)} experts with '{method}' on {device}")
    return path


def find_merge(outputs: dict[str, Any] | None, paths: Sequence[Path]) -> dict[str, Any]:
    """The outputs of the fit that merged, or an error saying that no fit has.

    Args:
        outputs: What the last fit wrote (the callback's record or receipt), or None.
        paths: The ``merge_with`` files, for the message.

    Raises:
        ValueError: No fit with this callback has written a merge.
    """
    if not outputs or not outputs.get("merged"):
        raise ValueError(
            f"ScoreMergeCallback(merge_with=[...]) has no merge to test: no fit with this callback has finished "
            f"(merge_with: {[str(p) for p in paths]}). Fit first; to test the expert alone, test "
            "without a merge_with callback."
        )
    return outputs


def merged_weights(outputs: dict[str, Any]) -> dict[str, Tensor]:
    """θ₀ + τ* for every snapshotted key (θ₀ where τ* has no entry), in float64 and stored in θ₀'s dtype.

    Args:
        outputs: What the fit wrote: ``pretrained`` (θ₀'s file), ``fingerprint`` (θ₀'s) and ``merged`` (τ*'s file).
    """
    pretrained = read_snapshot(outputs["pretrained"], outputs["fingerprint"])
    return TaskVector.load(outputs["merged"]).apply_to(pretrained)


def swap_in(selection: Selection, outputs: dict[str, Any], trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """Load θ₀ + τ* into the selected weights, in place (each keeps its dtype and device; each rank its shard).

    Args:
        selection: What the fit snapshotted, in the module to test.
        outputs: What the fit wrote (see :func:`merged_weights`).
        trainer: The Trainer testing (its strategy may shard the module, see :mod:`.sharded`); None: no Trainer.

    Returns:
        The submodule's own weights as they were (a copy on CPU, or each rank's shards), to load back after the test.
    """
    if selection.adapted:
        raise ValueError(
            "ScoreMergeCallback(merge_with=...) cannot test the merge inside a PEFT-adapted module yet (its weights "
            "are computed from the adapters, not held). Test the merged task vector the callback wrote "
            "(callback.merged_path) with MergeModule or `lightning-score test` on the base model."
        )
    own = keep_own(trainer, selection)
    load_selected(trainer, selection, merged_weights(outputs))
    return own
