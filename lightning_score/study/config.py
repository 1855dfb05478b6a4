"""What a study is: the base model, the domains, how experts are fine-tuned, and the rows of the table.

A study is the leave-one-domain-out protocol of the SCORE paper: one expert per domain and seed, then for
every target domain the other domains' experts merged by every method, next to the reference rows
(zero-shot, the logit ensemble, one model fine-tuned on the pooled source domains, the target's own expert).

:class:`StudyConfig` holds every setting of ``lightning-score study`` (the arguments of
:func:`~lightning_score.study.run_study`); the study resolves its ``auto`` values once and passes the resolved
config whole to every step. The rows are checked here, before any work starts (:func:`check_rows`,
:meth:`ExpertSettings.check`): a misspelled mode or method fails in seconds with one message, not after hours of
fine-tuning. :func:`check_rows` looks each row's merge method up once and hands the table's lines
(:class:`Entry`) on with it: whether the method reads data, whether it takes a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_score.merge_module.inputs import MODES as MERGE_MODULE_MODES
from lightning_score.merge_module.statistics import statistic_options
from lightning_score.merging import MethodSpec, get_method
from lightning_score.models.lora import LoraSettings, require_peft

__all__ = [
    "DEFAULT_ROWS",
    "JOB_SETTINGS",
    "MODES",
    "SECTIONS",
    "Entry",
    "ExpertSettings",
    "Row",
    "StudyConfig",
    "check_rows",
    "config_digest",
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
        lora: LoRA experts (:class:`~lightning_score.models.lora.LoraSettings`, e.g. ``{rank: 16}``; needs PEFT).
    """

    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    max_steps: int = -1
    max_epochs: int | None = None
    batch_size: int = 128
    precision: str = "32-true"
    gradient_clip_val: float = 1.0
    lora: LoraSettings | None = None

    def check(self) -> None:
        """Raise one clear error for a setting no fit could run with (LoRA without PEFT installed included)."""
        if self.lora is not None:
            require_peft()
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

JOB_SETTINGS: tuple[str, ...] = ("restart", "stage", "stage_domains")
"""The settings that say how one job of the study runs, not what the study is (``study.yaml`` leaves them out)."""


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of one study: the arguments of :func:`~lightning_score.study.run_study` (see there); tuples.

    Attributes:
        output_dir: The study folder.
        model_name: open_clip architecture, or ``auto``.
        pretrained: Its weights (a tag, a file, ``builtin:digits``, ``None``: random), or ``auto``.
        templates: The zero-shot head's template set, or ``auto``.
        backbone: The model's library (``open_clip``, ``hf``, ``timm``); backbone_options: its own settings.
        root: The data, or ``builtin:digits``.
        dataset: The dataset preset, ``auto`` or ``none``.
        domains: The study's domains (``None``: every domain of ``root``).
        targets: The held-out targets (``None``: every domain).
        expert: How experts and pooled models are fine-tuned (``None``: the dataset's default).
        rows: The table's rows.
        accelerator: Lightning accelerator.
        devices: Devices per node.
        num_nodes: Nodes.
        eval_batch_size: Batch size of the evaluations.
        num_workers: Data-loading worker processes.
        split_seed: Seed of the seeded splits.
        val_fraction: Part of each train split held out for validation (0: the sources' test splits validate).
        proxy_images: Unlabelled images per source domain for the merges that use data.
        seeds: The seeds (``None``: three on the built-in benchmark, one on real data).
        alpha_tuning: Also report every fixed-α merge at α chosen on the sources' validation data.
        alpha_search: ``grid`` or ``golden``.
        alpha_images: Validation images per source domain for the α search (``None``: all).
        bootstrap: Bootstrap resamples for the intervals.
        restart: Redo kept fits and results whose settings differ.
        stage: ``all``, ``experts`` or ``evaluate``.
        stage_domains: The domains whose experts ``stage: experts`` fits.
    """

    output_dir: str = "runs/digits-study"
    model_name: str = "auto"
    pretrained: str | None = "auto"
    templates: str = "auto"
    backbone: str = "open_clip"
    backbone_options: Mapping[str, Any] | None = None
    root: str = "builtin:digits"
    dataset: str = "auto"
    domains: Sequence[str] | None = None
    targets: Sequence[str] | None = None
    expert: ExpertSettings | None = None
    rows: Sequence[Row] = DEFAULT_ROWS
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    eval_batch_size: int = 256
    num_workers: int = 0
    split_seed: int = 17
    val_fraction: float = 0.0
    proxy_images: int = 32
    seeds: Sequence[int] | None = None
    alpha_tuning: bool = True
    alpha_search: str = "grid"
    alpha_images: int | None = 100
    bootstrap: int = 1000
    restart: bool = False
    stage: str = "all"
    stage_domains: Sequence[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        for name in ("domains", "targets", "rows", "seeds", "stage_domains"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def world_size(self) -> int:
        """Processes of every fit, merge and evaluation: ``devices × num_nodes``."""
        return self.devices * self.num_nodes

    def record(self) -> dict[str, Any]:
        """What the study is, as plain values (lists and dicts): every setting but :data:`JOB_SETTINGS`.

        ``study.yaml`` and results.json record it (the resolved config's).
        """
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in asdict(self).items()
            if name not in JOB_SETTINGS
        }


TUNED_SUFFIX = " (α tuned)"


@dataclass(frozen=True)
class Entry:
    """One line of the results table: a row, at its own α or at α chosen on the source validation data.

    Made by :func:`check_rows` (or :func:`table_entries`), which look the row's merge method up once.

    Attributes:
        row: The configured row.
        tuned: Whether this line is the row's α-tuned companion (same merge, α from the search).
        method: The registration of the row's merge method (``mode: merge``); ``None`` for a reference row.
    """

    row: Row
    tuned: bool = False
    method: MethodSpec | None = None

    def __post_init__(self) -> None:
        expected = self.row.method if self.row.mode == "merge" else None
        if (self.method.name if self.method is not None else None) != expected:
            raise ValueError(
                f"Entry of row {self.row.name!r}: a merge row's entry carries its method's registration and a "
                "reference row's none; make entries with check_rows or table_entries."
            )

    @property
    def name(self) -> str:
        """The label in the tables, e.g. ``"TIES"`` or ``"TIES (α tuned)"``."""
        return self.row.name + (TUNED_SUFFIX if self.tuned else "")

    @property
    def key(self) -> str:
        """File-name-safe identity (``ties``, ``ties-alpha-tuned``)."""
        return slug(self.row.name) + ("-alpha-tuned" if self.tuned else "")

    @property
    def needs_data(self) -> bool:
        """Whether the row's merge method reads data (ESM, RegMean, Fisher): the sources' proxy images."""
        return self.method is not None and self.method.needs_data

    @property
    def method_options(self) -> dict[str, Any]:
        """The options the row's merge runs with: the method's defaults under the row's own.

        A seeded method's ``seed`` is the study's, recorded on its own; statistics, which the study collects (their
        default is None), are left out. A result file records them, so that a kept result made with other defaults
        (an earlier release's) is not reused.
        """
        if self.method is None:
            return {}
        options = {**self.method.defaults, **self.row.options}
        if self.seeded and "seed" not in self.row.options:
            options.pop("seed")
        return {k: v for k, v in options.items() if isinstance(v, bool | int | float | str)}

    @property
    def seeded(self) -> bool:
        """Whether the row's merge method takes a ``seed`` (DARE, RandMix...)."""
        return self.method is not None and "seed" in self.method.defaults

    @property
    def section(self) -> str:
        """``data-free``, ``data`` (data-dependent method, or α from validation data) or ``reference``."""
        if self.row.mode != "merge":
            return "reference"
        uses_data = self.tuned or isinstance(self.row.alpha, str) or self.needs_data
        return "data" if uses_data else "data-free"


def _lines(rows: Sequence[Row], methods: Sequence[MethodSpec | None], tune_alpha: bool) -> list[Entry]:
    entries = [Entry(row, method=method) for row, method in zip(rows, methods, strict=True)]
    if tune_alpha:
        entries += [Entry(row, True, method) for row, method in zip(rows, methods, strict=True) if row.is_weight_merge]
    order = list(SECTIONS)
    return sorted(entries, key=lambda e: order.index(e.section))  # stable: the configured order within a section


def table_entries(rows: Sequence[Row], tune_alpha: bool) -> list[Entry]:
    """The table's lines, section by section; with ``tune_alpha`` every fixed-α merge also gets a tuned line.

    The rows are not checked (:func:`check_rows` checks them and returns the same lines); an unknown method
    raises :func:`~lightning_score.merging.get_method`'s error.
    """
    return _lines(rows, [get_method(row.method) if row.mode == "merge" else None for row in rows], tune_alpha)


def check_rows(rows: Sequence[Row], tune_alpha: bool = False) -> list[Entry]:
    """Validate every row before any work: mode, method, options, α, distinct names. One error names the row.

    Returns:
        The table's lines (as :func:`table_entries`), each carrying its row's merge method: the one lookup of
        each row's method, which the later steps read from the entry.
    """
    if not rows:
        raise ValueError("The study has no rows: give at least one method or reference row.")
    methods = [_check_row(index, row) for index, row in enumerate(rows)]
    entries = _lines(rows, methods, tune_alpha)
    keys = [entry.key for entry in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Row names must be distinct (after slugging): {[entry.name for entry in entries]}.")
    return entries


def _check_row(index: int, row: Row) -> MethodSpec | None:
    """One row's mode, α and options; its merge method's registration (``None`` for a reference row)."""
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
    if row.mode != "merge":
        if row.options:
            raise ValueError(f"{where}: options apply to mode 'merge' only; mode {row.mode!r} takes none.")
        return None
    try:
        spec = get_method(row.method)
        collected = statistic_options(row.method) if spec.needs_data else ()  # what MergeModule collects for them
        spec.resolve_options({k: v for k, v in row.options.items() if k not in collected})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    given = sorted(k for k in collected if row.options.get(k) is not None)
    if given:
        raise ValueError(
            f"{where}: {given} are statistics the study collects from the sources' proxy images for "
            f"'{row.method}'; remove them from the row's options."
        )
    return spec


def slug(name: str) -> str:
    """A file-name-safe version of a row name: ``"SCORE (diagonal only)"`` → ``"score-diagonal-only"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def config_digest(config: Any) -> str:
    """A short, stable hash of a JSON-able configuration (dataclasses are converted first)."""
    if hasattr(config, "__dataclass_fields__"):
        config = asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
