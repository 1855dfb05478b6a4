"""What a study is: the base model, the domains, how experts are fine-tuned, and the rows of the table.

A study is the leave-one-domain-out protocol of the SCORE paper (``shared/spec/protocol.md``): one expert
per domain, then for every target domain the other domains' experts merged by every method, next to the
reference rows (zero-shot, the logit ensemble, the target's own expert).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DEFAULT_ROWS", "ExpertSettings", "Row", "config_digest", "slug"]


@dataclass(frozen=True)
class ExpertSettings:
    """How each expert is fine-tuned (defaults: the SCORE protocol for real data).

    Attributes:
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        max_steps: Optimiser steps (-1: use ``max_epochs``).
        max_epochs: Epochs (ignored when ``max_steps`` is set).
        batch_size: Training batch size.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``).
        gradient_clip_val: Gradient-norm clipping.
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    max_steps: int = -1
    max_epochs: int | None = 10
    batch_size: int = 128
    precision: str = "32-true"
    gradient_clip_val: float = 1.0


@dataclass(frozen=True)
class Row:
    """One row of the results table.

    Attributes:
        name: The row's label in the tables.
        mode: ``merge`` (a merge method), ``zeroshot`` (θ₀), ``ensemble`` (the source experts' mean logits)
            or ``expert`` (the target domain's own expert: an upper bound, not a domain-generalization result).
        method: The merge method (``mode: merge``).
        options: The method's options, e.g. ``{variant: diagonal}``.
        alpha: The scaling coefficient α (1.0 in the paper's protocol), or ``auto``.
    """

    name: str
    mode: str = "merge"
    method: str = "score"
    options: dict[str, Any] = field(default_factory=dict)
    alpha: float | str = 1.0

    @property
    def is_reference(self) -> bool:
        """Reference rows (zero-shot, ensemble, expert) are reported but not ranked against the merges."""
        return self.mode != "merge"


DEFAULT_ROWS: tuple[Row, ...] = (
    Row("SCORE", method="score"),
    Row("SCORE (diagonal only)", method="score", options={"variant": "diagonal"}),
    Row("SCORE (off-diagonal only)", method="score", options={"variant": "off_diagonal"}),
    Row("SCORE (full matrix)", method="score", options={"variant": "full"}),
    Row("TSV-M", method="tsv"),
    Row("Iso-C", method="iso_c"),
    Row("Iso-CTS", method="iso_cts"),
    Row("TIES", method="ties"),
    Row("MagMax", method="magmax"),
    Row("PCB", method="pcb"),
    Row("Task Arithmetic", method="task_arithmetic"),
    Row("Averaging", method="average"),
    Row("ESM", method="esm"),
    Row("Zero-shot", mode="zeroshot"),
    Row("Logit ensemble", mode="ensemble"),
    Row("Expert (target domain)", mode="expert"),
)
"""The paper's table: SCORE, its three ablations, the baselines, and the reference rows."""


def slug(name: str) -> str:
    """A file-name-safe version of a row name: ``"SCORE (diagonal only)"`` → ``"score-diagonal-only"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def config_digest(config: Any) -> str:
    """A short, stable hash of a JSON-able configuration (dataclasses are converted first)."""
    if hasattr(config, "__dataclass_fields__"):
        config = asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
