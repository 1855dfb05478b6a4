"""What a run prints: the lines lightning-score writes, and the library noise it quiets.

* :func:`quiet_library_noise` drops messages that say nothing about the run: Lightning's advertising tips
  ("💡 Tip: … litlogger / litmodels"), its note that tensorboardX is no longer a dependency (the CSV logger
  is used), and torch's deprecation warning about ``LeafSpec`` raised from inside Lightning's own code.
  The ``lightning-score`` command calls it; call it yourself in a script for the same quiet console.
* :class:`EpochProgressBar`: Lightning's rich progress bar without the "Epoch 6/-2" of a step-limited fit.
* :func:`results_table`: the per-domain test metrics as one table, a row per domain.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

__all__ = ["EpochProgressBar", "quiet_library_noise", "results_table"]

_NOISE_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # Lightning: CSVLogger used instead, as it says
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch deprecation triggered inside Lightning
)


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: …" advertisements (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIPS_FILTER = _DropTips()


def quiet_library_noise() -> None:
    """Quiet Lightning's tips, its tensorboardX notice and torch's LeafSpec deprecation warning. Idempotent.

    Only those messages are dropped: every other warning and log line of Lightning stays.
    """
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _TIPS_FILTER not in logger.filters:
            logger.addFilter(_TIPS_FILTER)


class EpochProgressBar(RichProgressBar):
    """Lightning's rich progress bar; a fit limited by steps (``max_epochs=-1``) reads "Epoch 6", not "Epoch 6/-2".

    Overrides ``RichProgressBar._get_train_description`` (pinned by ``tests/lightning/test_console.py``).
    """

    @staticmethod
    def available() -> bool:
        """Whether ``rich`` is installed (else Lightning's default tqdm bar, which shows no epoch count, is kept)."""
        from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

        return bool(_RICH_AVAILABLE)

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"  # no flicker against "Validation"
        return description


_DOMAIN_METRIC = re.compile(r"^(?P<stage>test|val)/(?P<domain>.+)/(?P<metric>[^/]+)$")


def _number(value: Any) -> str:
    number = float(value.item() if hasattr(value, "item") else value)
    return "nan" if math.isnan(number) else f"{number:.4f}"


def results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The metrics of a test run as one table: a row per domain, a column per metric, then any other metric.

    ``results`` is what ``Trainer.test`` returns (one mapping per dataloader; with one loader per domain each
    repeats every domain's metrics). Metrics named ``test/<domain>/<metric>`` go in the table.

    Example:
        >>> print(results_table([{"test/rot0/acc": 0.91, "test/rot0/balanced_acc": 0.9, "alpha": 1.2}]))
        domain  acc     balanced_acc
        rot0    0.9100  0.9000
        alpha: 1.2000
    """
    merged: dict[str, Any] = {}
    for mapping in results:
        merged.update(mapping)
    rows: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    others: dict[str, Any] = {}
    for name, value in merged.items():
        match = _DOMAIN_METRIC.match(name)
        if match is None:
            others[name] = value
            continue
        rows.setdefault(match["domain"], {})[match["metric"]] = value
        if match["metric"] not in columns:
            columns.append(match["metric"])
    lines = []
    if rows:
        table = [["domain", *columns]]
        table += [[domain, *(_number(m[c]) if c in m else "-" for c in columns)] for domain, m in rows.items()]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines += [f"{name}: {_number(value)}" for name, value in others.items()]
    return "\n".join(lines)
