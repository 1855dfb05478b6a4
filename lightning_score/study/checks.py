"""Check a whole study configuration before any work starts.

Rows (mode, method, options, α: :func:`~lightning_score.study.config.check_rows`, run first by
:func:`~lightning_score.study.dataset.resolve_dataset`, before the data is read), fine-tuning settings, seeds,
the device count against the global batch, the α search, the model name, the weights, the template set, the data
root, its domains and targets, the precision and the accelerator: each bad value ends the study within seconds,
with one message that names the setting and the fix, never after the experts have been fine-tuned. The later
steps trust these checks (the fits do not check the batch against the device count again).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip

import lightning_score.models  # noqa: F401  (registers the tiny open_clip configs)
from lightning_score.data import DomainDataModule
from lightning_score.data.builtin import builtin_name, get_builtin
from lightning_score.merge_module.alpha import ALPHA_SEARCHES
from lightning_score.merge_module.matrices import check_convention
from lightning_score.models import load_templates
from lightning_score.models.backbones import get_backbone
from lightning_score.models.factory import check_model_name
from lightning_score.study.config import Entry, StudyConfig

__all__ = ["check_study"]


def _check_numbers(config: StudyConfig) -> None:
    seeds = list(config.seeds or [])
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}.")
    if any(not isinstance(seed, int) or isinstance(seed, bool) for seed in seeds):
        raise ValueError(f"seeds must be integers, got {seeds}.")
    for name in ("devices", "num_nodes"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer (devices per node, nodes), got {value!r}.")
    world_size, batch_size = config.world_size, config.expert.batch_size
    if batch_size % world_size:
        raise ValueError(
            f"expert.batch_size={batch_size} is the global batch of every DDP fit and must be divisible "
            f"by devices × num_nodes = {world_size} (each process loads batch_size / {world_size} images per step)."
        )
    for name in ("eval_batch_size", "proxy_images", "bootstrap"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}.")
    if config.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {config.num_workers}.")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction}.")
    if config.alpha_images is not None and config.alpha_images < 1:
        raise ValueError(
            f"alpha_images must be at least 1 (or null: every validation image), got {config.alpha_images}."
        )
    if config.alpha_search not in ALPHA_SEARCHES:
        raise ValueError(f"alpha_search={config.alpha_search!r}: choose one of {list(ALPHA_SEARCHES)}.")


def _check_model(model_name: str, pretrained: str | None, templates: str) -> None:
    check_model_name(model_name)
    if pretrained is not None:
        source = os.fspath(pretrained)
        if builtin_name(source) is not None:
            if get_builtin(source).base is None:  # an unknown name: one error listing the built-ins
                raise ValueError(f"pretrained={source!r}: that built-in has no base model; pass a tag or a file.")
        elif not open_clip.get_pretrained_cfg(model_name, source) and not Path(source).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(
                f"pretrained={source!r} is neither an existing weights file nor an open_clip tag of {model_name!r} "
                f"({tags or 'it has none'}). Fix the path, pick a tag, or use builtin:digits with a tiny model."
            )
    if templates != "auto":
        load_templates(templates)  # an unknown set: one error listing the shipped ones


def _check_rows_against_data(
    config: StudyConfig, entries: Sequence[Entry], data: DomainDataModule, domains: list[str]
) -> None:
    """The α search and ESM read the sources' validation data: make sure every domain has some."""
    needs_validation = config.alpha_tuning or any(e.row.alpha == "auto" or e.needs_data for e in entries)
    if not needs_validation:
        return
    empty = [d for d in domains if not data.split(d).val]
    if empty:
        raise ValueError(
            f"Domains {empty} of '{config.root}' have no validation images, which the α search and ESM read from the "
            "source domains. Set val_fraction > 0 (carve them from the train splits), or alpha_tuning: false and no "
            "ESM or alpha: auto rows."
        )


def check_study(config: StudyConfig, entries: Sequence[Entry]) -> tuple[list[str], list[str], list[str], str | None]:
    """Validate a study's configuration, cheapest first (its rows are checked already: ``entries``).

    Args:
        config: The configuration, with the dataset's preset applied (``expert`` and ``rows`` resolved,
            :func:`~lightning_score.study.dataset.resolve_dataset`); ``domains`` and ``targets`` as given.
        entries: The table's lines of its rows (:func:`~lightning_score.study.config.check_rows`).

    Returns:
        The domains, the targets, the class names and the dataset's own template set.

    Raises:
        ValueError: The first bad setting, named, with the fix (``FileNotFoundError`` for a missing data root).
    """
    config.expert.check()
    _check_numbers(config)
    backbone = get_backbone(config.backbone)  # an unknown name or option: one line, before any work
    backbone.check_options(config.backbone_options)
    for entry in entries:  # a method this backbone's merge refuses (ESM on transformers or timm): before the fits
        if entry.row.mode == "merge" and entry.row.method:
            try:
                check_convention(entry.row.method, entry.needs_data, backbone.convention, "fused")
            except ValueError as error:
                raise ValueError(f"Row {entry.row.name!r}: {error} Leave the row out of `rows`.") from None
    if backbone.name == "open_clip":
        _check_model(config.model_name, config.pretrained, config.templates)
    elif config.templates != "auto":
        load_templates(config.templates)
    data = DomainDataModule(
        config.root, num_workers=0, val_fraction=config.val_fraction, split_seed=config.split_seed,
        preset=config.dataset,
    )  # fmt: skip
    available = data.domains
    domains = _pick(config.domains, "domains", available)
    if len(domains) < 2:
        raise ValueError(f"A leave-one-domain-out study needs at least 2 domains; got {domains}.")
    targets = _pick(config.targets, "targets", domains)
    _check_rows_against_data(config, entries, data, domains)
    return domains, targets, data.classnames, data.default_templates


def _pick(given: Any, what: str, available: list[str]) -> list[str]:
    if given is None:
        return list(available)
    given = list(given)
    unknown = [d for d in given if d not in available]
    if unknown:
        raise ValueError(f"{what} {unknown} are not domains of the data; its domains are {list(available)}.")
    if len(set(given)) != len(given):
        raise ValueError(f"{what} lists a domain twice: {given}.")
    return given
