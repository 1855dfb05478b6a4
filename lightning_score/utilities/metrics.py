"""Accuracy metrics of the test loops: top-1 and balanced accuracy, summed over batches and processes.

:func:`per_class_counts` and :func:`balanced_accuracy` are the definitions (scikit-learn's
``balanced_accuracy_score``); :class:`BalancedAccuracy` is the torchmetrics Metric over them, and
:func:`accuracy_metrics` the collection :class:`~lightning_score.classifier.CLIPClassifier` logs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

__all__ = ["BalancedAccuracy", "accuracy_metrics", "balanced_accuracy", "per_class_counts"]


def per_class_counts(preds: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Correct predictions and images per class: the state balanced accuracy is computed from.

    Args:
        preds: Logits ``[N, C]`` or labels ``[N]``.
        target: Labels ``[N]``.
        num_classes: Number of classes.

    Returns:
        ``(correct [C], total [C])``.
    """
    if preds.ndim == 2:
        preds = preds.argmax(dim=-1)
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[preds == target], minlength=num_classes)
    return correct, total


def balanced_accuracy(correct: Tensor, total: Tensor) -> Tensor:
    """Mean per-class recall over the classes present in the targets (scikit-learn's ``balanced_accuracy_score``).

    Classes that never occur in the targets are left out of the mean, even when they were predicted.

    Args:
        correct: Correct predictions per class (:func:`per_class_counts`).
        total: Images per class.

    Example:
        >>> preds, target = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
        >>> balanced_accuracy(*per_class_counts(preds, target, num_classes=3)).item()  # (1/1 + 1/3) / 2
        0.6666666865348816
    """
    present = total > 0
    return (correct[present].float() / total[present].float()).mean()


class BalancedAccuracy(Metric):
    """:func:`balanced_accuracy` as a torchmetrics Metric: per-class counts summed over batches (and processes).

    Args:
        num_classes: Number of classes.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` as logits ``[N, C]`` or labels ``[N]``; ``target`` labels ``[N]``."""
        correct, total = per_class_counts(preds, target, self.num_classes)
        self.correct += correct
        self.total += total

    @override
    def compute(self) -> Tensor:
        """The balanced accuracy in [0, 1]."""
        return balanced_accuracy(self.correct, self.total)


def accuracy_metrics(num_classes: int, sync: bool) -> MetricCollection:
    """Top-1 and balanced accuracy; ``sync``: sum the counts over the Trainer's processes when computing.

    torchmetrics would otherwise sync whenever a process group exists, even for a single-device Trainer
    running in one process of a DDP job (where the other processes never join: a hang).
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", sync_on_compute=sync),
            "balanced_acc": BalancedAccuracy(num_classes, sync_on_compute=sync),
        },
        compute_groups=False,
    )
