"""What a study is: the base model, the domains, how experts are fine-tuned, and the rows of the table.

A study is the leave-one-domain-out protocol of the SCORE paper: one expert per domain and seed, then for
every target domain the other domains' experts merged by every method, next to the reference rows
(zero-shot, the logit ensemble, one model fine-tuned on the pooled source domains, the target's own expert).

Every setting is checked here, before any work starts (:func:`check_rows`, :meth:`ExpertSettings.check`):
a misspelled mode or method fails in seconds with one message, not after hours of fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_score.data.builtin import builtin_name
from lightning_score.merge_module.inputs import MODES as MERGE_MODULE_MODES

__all__ = [
    "DEFAULT_ROWS",
    "MODES",
    "SECTIONS",
    "Entry",
    "ExpertSettings",
    "Row",
    "check_rows",
    "config_digest",
    "resolve_seeds",
    "slug",
    "table_entries",
]

MODES: tuple[str, ...] = (*MERGE_MODULE_MODES, "pooled")
"""Row modes: a merge method, θ₀, the sources' logit ensemble, a pooled multi-source fine-tune, the target's expert."""

SECTIONS: dict[str, str] = {
    "data-free": "Data-free merges (α = 1)",
    "data": "Merges that use data (ESM; α chosen on the source domains' validation data)",
    "reference": "References",
}
"""The table's sections, in order; methods are ranked only within a section."""


@dataclass(frozen=True)
class ExpertSettings:
    """How each expert is fine-tuned (defaults: the SCORE protocol for real data, epochs from the dataset's preset).

    Attributes:
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        max_steps: Optimiser steps (-1: use ``max_epochs``).
        max_epochs: Epochs (ignored when ``max_steps`` is set); ``None``: the dataset preset's epochs (10 for data
            without a preset), filled in when the study resolves its dataset (:mod:`.dataset`).
        batch_size: Training batch size.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``).
        gradient_clip_val: Gradient-norm clipping.
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    max_steps: int = -1
    max_epochs: int | None = None
    batch_size: int = 128
    precision: str = "32-true"
    gradient_clip_val: float = 1.0

    def check(self) -> None:
        """Raise one clear error for a setting no fit could run with."""
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"expert: need lr > 0, weight_decay >= 0 and warmup_steps >= 0; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, warmup_steps={self.warmup_steps}."
            )
        if self.batch_size < 1:
            raise ValueError(f"expert.batch_size must be at least 1, got {self.batch_size}.")
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(
                f"expert.max_steps must be a positive number of steps or -1 (use max_epochs), got {self.max_steps}."
            )
        if self.max_steps == -1 and (self.max_epochs is None or self.max_epochs < 1):
            raise ValueError(
                f"expert: set max_steps, or max_epochs >= 1 with max_steps: -1; got max_epochs={self.max_epochs}."
            )
        if self.gradient_clip_val < 0:
            raise ValueError(f"expert.gradient_clip_val must be >= 0, got {self.gradient_clip_val}.")


@dataclass(frozen=True)
class Row:
    """One row of the results table.

    Attributes:
        name: The row's label in the tables.
        mode: ``merge`` (a merge method), ``zeroshot`` (θ₀), ``ensemble`` (the source experts' mean logits),
            ``pooled`` (one model fine-tuned on all source domains together, the standard domain-generalization
            baseline, "ERM") or ``expert`` (the target domain's own expert: an upper bound, not a
            domain-generalization result).
        method: The merge method (``mode: merge``).
        options: The method's options, e.g. ``{variant: diagonal}``.
        alpha: The scaling coefficient α (1.0 in the paper's protocol), or ``auto`` (chosen on the source
            domains' validation data only).
    """

    name: str
    mode: str = "merge"
    method: str = "score"
    options: dict[str, Any] = field(default_factory=dict)
    alpha: float | str = 1.0

    @property
    def is_reference(self) -> bool:
        """Reference rows (zero-shot, ensemble, pooled, expert) are reported but not ranked against the merges."""
        return self.mode != "merge"

    @property
    def is_weight_merge(self) -> bool:
        """A merge at a fixed α: the rows the study also reports at α chosen on validation data."""
        return self.mode == "merge" and not isinstance(self.alpha, str)


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
    Row("Pooled fine-tune (ERM)", mode="pooled"),
    Row("Expert (target domain)", mode="expert"),
)
"""The paper's table: SCORE, its three ablations, the baselines, and the reference rows."""

TUNED_SUFFIX = " (α tuned)"


@dataclass(frozen=True)
class Entry:
    """One line of the results table: a row, at its own α or at α chosen on the source validation data.

    Attributes:
        row: The configured row.
        tuned: Whether this line is the row's α-tuned companion (same merge, α from the search).
    """

    row: Row
    tuned: bool = False

    @property
    def name(self) -> str:
        """The label in the tables, e.g. ``"TIES"`` or ``"TIES (α tuned)"``."""
        return self.row.name + (TUNED_SUFFIX if self.tuned else "")

    @property
    def key(self) -> str:
        """File-name-safe identity (``ties``, ``ties-alpha-tuned``)."""
        return slug(self.row.name) + ("-alpha-tuned" if self.tuned else "")

    @property
    def section(self) -> str:
        """``data-free``, ``data`` (data-dependent method, or α from validation data) or ``reference``."""
        if self.row.mode != "merge":
            return "reference"
        from lightning_score.merging import get_method

        uses_data = self.tuned or isinstance(self.row.alpha, str) or get_method(self.row.method).needs_data
        return "data" if uses_data else "data-free"


def table_entries(rows: Sequence[Row], tune_alpha: bool) -> list[Entry]:
    """The table's lines, section by section; with ``tune_alpha`` every fixed-α merge also gets a tuned line."""
    entries = [Entry(row) for row in rows]
    if tune_alpha:
        entries += [Entry(row, tuned=True) for row in rows if row.is_weight_merge]
    order = list(SECTIONS)
    return sorted(entries, key=lambda e: order.index(e.section))  # stable: the configured order within a section


BUILTIN_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Seeds of a study of the built-in benchmark, unless set (one seed, 0, for real data)."""


def resolve_seeds(root: str, seeds: Sequence[int] | None, seed: int | None) -> list[int]:
    """The seeds: ``seeds`` if given; else ``[seed]`` (deprecated); else three on built-in data, one on real data."""
    if seed is not None and seeds is not None and list(seeds) != [seed]:
        raise ValueError(f"Give seeds (a list) or the deprecated seed, not both: seeds={list(seeds)}, seed={seed}.")
    if seeds is not None:
        return list(seeds)
    if seed is not None:
        return [seed]
    return list(BUILTIN_SEEDS) if builtin_name(str(root)) is not None else [0]


def check_rows(rows: Sequence[Row], tune_alpha: bool = False) -> None:
    """Validate every row before any work: mode, method, options, α, distinct names. One error names the row."""
    from lightning_score.merge_module.statistics import statistic_options
    from lightning_score.merging import get_method

    if not rows:
        raise ValueError("The study has no rows: give at least one method or reference row.")
    for index, row in enumerate(rows):
        where = f"rows[{index}] ({row.name!r})"
        if not isinstance(row.name, str) or not row.name.strip():
            raise ValueError(f"rows[{index}] needs a name.")
        if row.mode not in MODES:
            raise ValueError(f"{where} has mode {row.mode!r}; choose one of {list(MODES)}.")
        if isinstance(row.alpha, str):
            if row.alpha != "auto":
                raise ValueError(f"{where} has alpha {row.alpha!r}: give a number or 'auto'.")
            if row.mode != "merge":
                raise ValueError(f"{where}: alpha 'auto' applies to mode 'merge' only, not {row.mode!r}.")
        elif not (isinstance(row.alpha, int | float) and row.alpha == row.alpha):
            raise ValueError(f"{where} has alpha {row.alpha!r}: give a number or 'auto'.")
        if row.mode == "merge":
            try:
                spec = get_method(row.method)
                collected = statistic_options(row.method)  # data methods: what MergeModule collects for them
                spec.resolve_options({k: v for k, v in row.options.items() if k not in collected})
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            given = sorted(k for k in collected if row.options.get(k) is not None)
            if given:
                raise ValueError(
                    f"{where}: {given} are statistics the study collects from the sources' proxy images for "
                    f"'{row.method}'; remove them from the row's options."
                )
        elif row.options:
            raise ValueError(f"{where}: options apply to mode 'merge' only; mode {row.mode!r} takes none.")
    entries = table_entries(rows, tune_alpha)
    keys = [entry.key for entry in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Row names must be distinct (after slugging): {[entry.name for entry in entries]}.")


def slug(name: str) -> str:
    """A file-name-safe version of a row name: ``"SCORE (diagonal only)"`` → ``"score-diagonal-only"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def config_digest(config: Any) -> str:
    """A short, stable hash of a JSON-able configuration (dataclasses are converted first)."""
    if hasattr(config, "__dataclass_fields__"):
        config = asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
