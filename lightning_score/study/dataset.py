"""Which dataset a study runs, and what the SCORE paper's protocol fixes for it when the recipe does not say.

A study's data is read by :class:`~lightning_score.data.DomainDataModule`, which detects the dataset's
:mod:`preset <lightning_score.data.presets>` from its domain folders (or is told one with ``dataset``). From
the preset, with no option given, a study takes:

* the prompt templates (``templates: auto``): the authors' set of the dataset (``pacs``, ``imagenet``,
  ``terra_incognita``, ``fed_isic2019``, ``retina``), ``digits`` for the built-in benchmark;
* the split: the datamodule reads the dataset in its layout with the authors' split rule, told the preset;
* the experts' epochs (``expert.max_epochs: null`` with ``max_steps: -1``): the preset's (10 for PACS,
  OfficeHome, DomainNet, ImageNet-R, VLCS; 15 for TerraIncognita and NICO++; 20 for Fed-ISIC2019 and
  RetinaDomains), 10 for data without a preset;
* the fine-tuning settings when ``expert`` is not given at all: the paper's (:class:`ExpertSettings`'
  defaults: AdamW lr 1e-5, weight decay 0.1, 500 warm-up steps, batch 128, fp32) with the preset's epochs
  on real data, and the built-in benchmark's short schedule (:data:`DIGITS_EXPERT`) on ``builtin:digits``;
* the model (``model_name: auto``, ``pretrained: auto``): the paper's main backbone, open_clip's ViT-B/32
  with the ``openai`` weights, on real data; the tiny CPU model and its offline base
  (``tiny-ViT-W96-L3``, ``builtin:digits``) on the built-in benchmark. ``pretrained: auto`` with another
  architecture takes its ``openai`` weights where open_clip has them, and is an error naming the choices
  where it has not;
* SCORE's threshold: the preset's SCORE options (``divide_by_tasks: false`` for Fed-ISIC2019 and
  RetinaDomains, the authors' choice for the medical datasets) in every ``score`` row that does not set
  that option itself.

Validation data stays the sources' test splits (``val_fraction: 0``, the default). The resolved values
are what the study runs with, what ``study.yaml`` records and what ``lightning-score study --print_config``
shows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip

from lightning_score.data import DomainDataModule
from lightning_score.data.builtin import BUILTIN_PREFIX, builtin_name, get_builtin
from lightning_score.data.presets import DatasetPreset, get_preset
from lightning_score.models.templates import guess_template_set
from lightning_score.study.config import DEFAULT_ROWS, Entry, ExpertSettings, Row, check_rows

__all__ = [
    "BUILTIN_MODEL",
    "BUILTIN_SEEDS",
    "DEFAULT_EPOCHS",
    "DIGITS_EXPERT",
    "PAPER_MODEL",
    "DatasetChoice",
    "preset_rows",
    "resolve_dataset",
    "resolve_model",
    "resolve_seeds",
    "resolved_arguments",
]

log = logging.getLogger(__name__)

DIGITS_EXPERT = ExpertSettings(lr=1e-3, warmup_steps=15, max_steps=150, max_epochs=None, batch_size=64)
"""The built-in benchmark's fine-tuning: 150 steps at lr 1e-3 (150 steps at 1e-4 leave its experts at 48-87 %)."""

DEFAULT_EPOCHS = 10
"""Expert epochs on data without a preset (the SCORE paper's most common setting)."""

PAPER_MODEL = ("ViT-B-32", "openai")
"""``model_name: auto`` and ``pretrained: auto`` on real data: the SCORE paper's main backbone and weights."""

BUILTIN_MODEL = ("tiny-ViT-W96-L3", f"{BUILTIN_PREFIX}digits")
"""``model_name: auto`` and ``pretrained: auto`` on the built-in benchmark: the tiny CPU model, its offline base."""

FALLBACK_TEMPLATES = "imagenet"
"""``templates: auto`` on data that neither a preset nor a shipped set recognises (CLIP's 80 ImageNet prompts)."""


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


@dataclass(frozen=True)
class DatasetChoice:
    """What a study runs with, after ``auto`` and unset values are filled from the dataset's preset.

    Attributes:
        dataset: The preset's name, or ``"none"`` (no preset: the built-in digits, or data no preset knows).
        preset: The preset, or ``None``.
        templates: The prompt-template set.
        expert: The fine-tuning settings, with ``max_epochs`` set when ``max_steps`` is -1.
        rows: The table's rows, SCORE rows carrying the preset's SCORE options.
        model_name: The open_clip architecture (see :func:`resolve_model`).
        pretrained: Its weights (an open_clip tag, a weights file, ``builtin:digits``, or ``None``: random).
        layout: The layout the data was read in (``presplit``, ``pacs_lists``...), or ``None`` when unread (a
            built-in benchmark is not read here: it has no preset).
        entries: The table's lines of ``rows`` (:func:`~lightning_score.study.config.check_rows`), each with its
            row's merge method.
    """

    dataset: str
    preset: DatasetPreset | None
    templates: str
    expert: ExpertSettings
    rows: list[Row]
    model_name: str
    pretrained: str | None
    layout: str | None = None
    entries: list[Entry] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """One line for the log: the dataset, its split and what was taken from its preset."""
        what = f"{self.preset.title} (preset '{self.dataset}')" if self.preset else "no dataset preset"
        split = f", split: {self.preset.split}" if self.preset else ""
        epochs = f"{self.expert.max_steps} steps" if self.expert.max_steps > 0 else f"{self.expert.max_epochs} epochs"
        options = dict(self.preset.score_options) if self.preset else {}
        return (
            f"dataset: {what}, layout {self.layout or 'not read'}{split}; templates '{self.templates}', experts "
            f"{epochs}, SCORE options {options or 'the defaults'}"
        )


def _named_preset(dataset: str) -> DatasetPreset | None:
    if dataset in ("auto", "none"):
        return None
    return get_preset(dataset)  # an unknown name: one error listing the presets


def _builtin(root: str, named: DatasetPreset | None) -> str:
    """The template set of a built-in benchmark (which has no preset), without building its files."""
    builtin = get_builtin(root)  # an unknown name: one error listing the built-ins
    if named is not None:
        raise ValueError(
            f"dataset='{named.name}' but root '{root}' is a built-in benchmark, not {named.title}. Use dataset: auto "
            "(or none) with it, or point root at the dataset."
        )
    return builtin.templates


def _check_matches(preset: DatasetPreset, data: DomainDataModule, root: str) -> None:
    """A forced preset must be the data's dataset: every domain folder one of its domains."""
    foreign = [d for d in data.domains if preset.canonical_domain(d) is None]
    if foreign:
        raise ValueError(
            f"dataset='{preset.name}' but the domains {foreign} of '{root}' are not {preset.title}'s "
            f"({list(preset.domains)}). Fix root, or set dataset: auto (detect from the domains) or none (no preset)."
        )


def _templates(templates: str, preset: DatasetPreset | None, data: DomainDataModule | None, dataset: str) -> str:
    if templates != "auto":
        return templates
    if preset is not None:
        return preset.templates
    if data is None:
        return templates
    own = data.default_templates  # "digits" for the built-in benchmark
    if own:
        return own
    guessed = guess_template_set(data.domains) if dataset == "auto" else None
    return guessed or FALLBACK_TEMPLATES


def _expert(expert: ExpertSettings | None, preset: DatasetPreset | None, builtin: bool) -> ExpertSettings:
    if expert is None:
        expert = DIGITS_EXPERT if builtin else ExpertSettings()
    if expert.max_steps == -1 and expert.max_epochs is None:
        expert = dataclasses.replace(expert, max_epochs=preset.epochs if preset else DEFAULT_EPOCHS)
    return expert


def resolve_model(model_name: str, pretrained: str | None, builtin: bool) -> tuple[str, str | None]:
    """The model a study fine-tunes, ``auto`` values filled in (see the module docstring).

    Args:
        model_name: An open_clip architecture, or ``auto``.
        pretrained: An open_clip tag, a weights file, ``builtin:digits``, ``None`` (random weights), or ``auto``.
        builtin: Whether the data is a built-in benchmark.

    Returns:
        ``(model_name, pretrained)``.

    Raises:
        ValueError: ``pretrained: auto`` for an architecture that has no ``openai`` weights, on real data.
    """
    if model_name == "auto":
        model_name = (BUILTIN_MODEL if builtin else PAPER_MODEL)[0]
    if pretrained is None or os.fspath(pretrained) != "auto":
        return model_name, pretrained
    if builtin:
        return model_name, BUILTIN_MODEL[1]
    if open_clip.get_model_config(model_name) is None:
        return model_name, pretrained  # not an architecture: the study's checks say so, listing the choices
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if PAPER_MODEL[1] in tags:
        return model_name, PAPER_MODEL[1]
    raise ValueError(
        f"pretrained: auto takes the '{PAPER_MODEL[1]}' weights (the SCORE paper's), which open_clip does not have "
        f"for model_name {model_name!r}. Set pretrained to one of its tags {tags or '(it has none)'}, a local "
        "weights file, or null (random weights)."
    )


def preset_rows(rows: Sequence[Row] | None, preset: DatasetPreset | None) -> list[Row]:
    """The rows (default: the paper's table), each ``score`` row given the preset's SCORE options it does not set."""
    rows = list(DEFAULT_ROWS if rows is None else rows)
    options = dict(preset.score_options) if preset is not None else {}
    if not options:
        return rows
    return [
        dataclasses.replace(row, options={**options, **row.options})
        if row.mode == "merge" and row.method == "score"
        else row
        for row in rows
    ]


def resolve_dataset(
    root: str,
    dataset: str = "auto",
    templates: str = "auto",
    expert: ExpertSettings | None = None,
    rows: Sequence[Row] | None = None,
    *,
    read_data: bool = True,
    model_name: str = "auto",
    pretrained: str | None = "auto",
    tune_alpha: bool = False,
) -> DatasetChoice:
    """Fill a study's ``auto`` and unset settings from its dataset's preset (see the module docstring).

    Args:
        root: The data (any layout ``DomainDataModule`` reads) or ``builtin:digits``.
        dataset: ``auto`` (detect the preset from the root's domain folders), ``none`` (no preset), or a
            preset's name (``pacs``, ``office_home``...), which must match the data.
        templates: A template set, or ``auto`` (the dataset's).
        expert: Fine-tuning settings, or ``None`` (the paper's on real data, the built-in benchmark's on digits).
        rows: The table's rows, or ``None`` (the paper's table).
        read_data: Read ``root`` to detect or check the preset. With ``False`` (``--print_config`` of a recipe
            whose data is elsewhere) only a named ``dataset`` is applied; ``auto`` values stay ``auto``.
        model_name: An open_clip architecture, or ``auto`` (see :func:`resolve_model`).
        pretrained: Its weights, or ``auto``.
        tune_alpha: Whether the table also has every fixed-α merge at α tuned (its lines' names must be distinct).

    Returns:
        The resolved choice.

    Raises:
        ValueError: A bad row (checked first, so that it never waits for the data), ``pretrained: auto`` for an
            architecture without the paper's weights, an unknown preset, or a preset that does not match the
            data (naming both).
        FileNotFoundError: ``root`` does not exist (when ``read_data``).
    """
    given = list(DEFAULT_ROWS if rows is None else rows)
    checked = check_rows(given, tune_alpha)  # each row's method looked up here, once
    builtin = builtin_name(str(root)) is not None
    model_name, pretrained = resolve_model(model_name, pretrained, builtin)
    named = _named_preset(dataset)
    data = None
    if builtin:  # no preset: nothing to read (its files are built, once, when the study first needs them)
        preset = None
        own = _builtin(str(root), named)
        templates = own if templates == "auto" else templates
    elif read_data:
        data = DomainDataModule(str(root), num_workers=0, preset=named.name if named else dataset)
        with warnings.catch_warnings(record=True) as caught:  # held back: data of another dataset is refused first
            warnings.simplefilter("always")
            _ = data.index
        if named is not None:
            _check_matches(named, data, root)
        for warning in caught:  # e.g. "looks like PACS, read as layout 'unsplit'": the data's own warnings
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        preset = data.preset
    else:
        preset = named
    filled = preset_rows(given, preset)  # the same methods, SCORE options added: the lines carry the new rows
    by_name = {row.name: row for row in filled}
    return DatasetChoice(
        dataset=preset.name if preset is not None else ("none" if read_data or builtin else dataset),
        preset=preset,
        templates=_templates(templates, preset, data, dataset),
        expert=_expert(expert, preset, builtin) if read_data or named or builtin else expert or ExpertSettings(),
        rows=filled,
        model_name=model_name,
        pretrained=pretrained,
        layout=data.layout if data is not None else None,
        entries=[dataclasses.replace(entry, row=by_name[entry.row.name]) for entry in checked],
    )


def resolved_arguments(arguments: Any) -> dict[str, Any]:
    """The study arguments that :func:`resolve_dataset` (and the seeds' default) fill in, as plain values.

    What ``lightning-score study --print_config`` shows instead of ``auto`` and null: ``model_name``,
    ``pretrained``, ``dataset``, ``templates``, ``expert``, ``rows`` and ``seeds``. When ``root`` does not
    exist (a recipe printed away from its data), a named ``dataset`` still applies and the data-dependent
    values stay ``auto`` (a warning says so); the study itself then stops at the missing root.

    Args:
        arguments: The parsed arguments of ``run_study`` (attributes ``root``, ``model_name``, ``pretrained``,
            ``dataset``, ``templates``, ``expert``, ``rows``, ``seeds``, ``seed``), with ``expert`` and ``rows`` as
            dataclasses.
    """
    root = str(arguments.root)
    readable = builtin_name(root) is not None or Path(root).expanduser().exists()
    if not readable and arguments.dataset == "auto":
        log.warning(
            "root '%s' does not exist here: the dataset, templates and epochs it decides are shown as given "
            "('auto'/null); they are resolved from the data when the study runs.",
            root,
        )
    choice = resolve_dataset(
        root, arguments.dataset, arguments.templates, arguments.expert, arguments.rows, read_data=readable,
        model_name=arguments.model_name, pretrained=arguments.pretrained,
    )  # fmt: skip
    return {
        "model_name": choice.model_name,
        "pretrained": choice.pretrained,
        "dataset": choice.dataset,
        "templates": choice.templates,
        "expert": asdict(choice.expert),
        "rows": [asdict(row) for row in choice.rows],
        "seeds": resolve_seeds(root, arguments.seeds, arguments.seed),
        "seed": None,
    }
