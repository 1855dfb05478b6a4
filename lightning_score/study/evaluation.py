"""Evaluate one row on one fold: per-image predictions from ``Trainer.predict``, at α = 1 and at α tuned.

A row is a :class:`~lightning_score.MergeModule` (the same module a user tests with), run under the study's
one evaluation Trainer. ``Trainer.predict`` gives every test image's prediction
(:meth:`~lightning_score.classifier.CLIPClassifier.predict_step`), from which the study computes accuracy,
balanced accuracy and the 0/1 correctness vector its bootstrap needs. A weight merge is computed once: after
α = 1 is tested, :meth:`~lightning_score.MergeModule.choose_alpha` searches α on the fold's SOURCE
validation data, the chosen α is loaded from that same merge, and the target is tested again.

On several ranks (see :mod:`.distributed`) the evaluation is exact: each rank predicts its own contiguous run
of whole test batches, with no distributed sampler (nothing padded, nothing dropped), and the ranks'
predictions are gathered to every rank in the test set's order before any number is computed. The α search's
validation accuracy is MergeModule's own: each rank counts correct/total on its share of the validation
images and the counts are summed across the ranks, so every image counts once there too.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_score.classifier import balanced_accuracy, per_class_counts
from lightning_score.merge_module import MergeModule
from lightning_score.merging import FactorCache
from lightning_score.study.config import Entry, StudyConfig
from lightning_score.study.data import FoldData
from lightning_score.study.distributed import World

__all__ = ["Prediction", "evaluate_row", "merge_module", "pack_correct", "unpack_correct"]


@dataclass(frozen=True)
class Prediction:
    """A model's predictions on one target's test split."""

    preds: torch.Tensor
    labels: torch.Tensor
    shares: tuple[int, ...] = ()  #: Images predicted by each rank (one entry per rank, in rank order).

    @property
    def correct(self) -> np.ndarray:
        """0/1 per test image, in the loader's order."""
        return (self.preds == self.labels).numpy().astype(bool)

    def accuracy(self) -> float:
        """Top-1 accuracy."""
        return float(self.correct.mean())

    def balanced_accuracy(self) -> float:
        """Mean per-class recall over the classes in the labels (:func:`.classifier.balanced_accuracy`)."""
        classes = int(max(self.preds.max(), self.labels.max())) + 1 if len(self.labels) else 1
        return float(balanced_accuracy(*per_class_counts(self.preds, self.labels, classes)))

    def labels_digest(self) -> str:
        """A hash of the labels in order: every row of a target must see the same images in the same order."""
        return hashlib.sha256(self.labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


def pack_correct(correct: np.ndarray) -> str:
    """0/1 per image as compact text (base64 of the packed bits) for the results JSON."""
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, count: int) -> np.ndarray:
    """The inverse of :func:`pack_correct`."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return bits[:count].astype(bool)


def _predict(trainer: L.Trainer, module: MergeModule, data: FoldData, world: World | None = None) -> Prediction:
    """Every test image's prediction, in the test set's order (each rank predicts its share; gathered to all).

    A failure inside ``Trainer.predict`` is not exchanged between the ranks (the others may be inside one of
    Lightning's own collectives): it ends this process, and the launcher (Lightning's, torchrun, srun with
    ``--kill-on-bad-exit``) ends the others.
    """
    outputs = trainer.predict(module, datamodule=data, return_predictions=True)
    batches = outputs if outputs and isinstance(outputs[0], dict) else [b for part in outputs or [] for b in part]
    if any("labels" not in b for b in batches):
        raise RuntimeError(f"Predicting on '{data.target}' returned batches without labels.")
    if batches:
        own = torch.cat([b["preds"].cpu() for b in batches]), torch.cat([b["labels"].cpu() for b in batches])
    else:  # a rank whose share is empty (more ranks than test batches)
        own = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    shares = (world or World()).gather(lambda: own)
    preds, labels = torch.cat([p for p, _ in shares]), torch.cat([y for _, y in shares])
    if len(labels) == 0:
        raise RuntimeError(f"Predicting on '{data.target}' returned no labelled batches.")
    return Prediction(preds, labels, tuple(len(y) for _, y in shares))


def merge_module(
    entry: Entry, task_vectors: list[str], config: StudyConfig, *, seed: int, factors: FactorCache | None = None
) -> MergeModule:
    """The MergeModule of an entry's row (at α = 1, or ``auto`` for a row that asks for it).

    One module serves the row's lines (its own α, then α tuned). The model, templates, ``proxy_images`` and
    ``alpha_search`` are the study's (``config``). A seeded merge method (DARE, RandMix...: :attr:`Entry.seeded`)
    takes the study's seed unless the row sets its own. ``factors`` is the seed's
    :class:`~lightning_score.merging.FactorCache`, shared by every merge row of every target: the SVD-based methods
    (SCORE and its variants, TSV-M, Iso-CTS, ESM's TSV layers) then factorize each expert once per seed
    (bit-identical merges); the other methods ignore it.
    """
    row = entry.row
    mode = "expert" if row.mode == "pooled" else row.mode
    method_options = dict(row.options)
    if entry.seeded:
        method_options.setdefault("seed", seed)
    return MergeModule(
        config.model_name,
        config.pretrained,
        task_vectors=task_vectors,
        method=row.method,
        mode=mode,  # type: ignore[arg-type]
        alpha=row.alpha,
        method_options=method_options,
        proxy_images=config.proxy_images,
        templates=config.templates,
        alpha_search=config.alpha_search,  # type: ignore[arg-type]
        factors=factors if mode == "merge" else None,
        backbone=config.backbone,
        backbone_options=dict(config.backbone_options or {}),
    )


def _record(
    entry: Entry, prediction: Prediction, module: MergeModule, alpha: Any, search: Any, seconds: float
) -> dict[str, Any]:
    correct = prediction.correct
    return {
        "method": entry.name,
        "row": entry.row.name,
        "section": entry.section,
        "tuned": entry.tuned,
        "mode": entry.row.mode,
        "merge_method": entry.row.method if entry.row.mode == "merge" else None,
        "options": dict(entry.row.options),
        "acc": prediction.accuracy(),
        "balanced_acc": prediction.balanced_accuracy(),
        "alpha": alpha,
        "alpha_search": search,
        "merge_seconds": module.merge_seconds,
        "peak_memory_mb": None if module.merge_peak_bytes is None else module.merge_peak_bytes / 2**20,
        "eval_seconds": seconds,
        "num_images": len(correct),
        "images_per_rank": list(prediction.shares),
        "labels_digest": prediction.labels_digest(),
        "correct": pack_correct(correct),
    }


def evaluate_row(
    trainer: L.Trainer, module: MergeModule, data: FoldData, entries: list[Entry], world: World | None = None
) -> dict[str, dict[str, Any]]:
    """Test a row's module on the fold's target: its own α first, then (for a tuned entry) the searched α.

    Args:
        trainer: The study's evaluation Trainer (reused across rows).
        module: The row's MergeModule.
        data: The fold.
        entries: The row's table lines to produce: the plain one and/or its α-tuned companion.
        world: The study's ranks (default: this process alone); every rank gets the same records.

    Returns:
        Entry key -> record (accuracy, balanced accuracy, α, merge cost, packed per-image correctness...).
    """
    records = {}
    started = time.perf_counter()
    prediction = _predict(trainer, module, data, world)  # setup merges (and, for alpha: auto, searches α) once
    searched = module.alpha_search_result
    own_search = searched.to_dict() if searched is not None and entries[0].row.alpha == "auto" else None
    own_alpha = own_search["selected"] if own_search else entries[0].row.alpha
    for entry in entries:
        if not entry.tuned:
            seconds = time.perf_counter() - started
            records[entry.key] = _record(entry, prediction, module, own_alpha, own_search, seconds)
    for entry in (e for e in entries if e.tuned):
        started = time.perf_counter()
        alpha = float(module.choose_alpha())  # on the fold's source validation data only (FoldData.val_dataloader)
        search = module.alpha_search_result.to_dict() if module.alpha_search_result is not None else None
        if alpha != own_alpha:  # the same α loads the same weights: its predictions are those above
            prediction = _predict(trainer, module, data, world)
        records[entry.key] = _record(entry, prediction, module, alpha, search, time.perf_counter() - started)
    return records
