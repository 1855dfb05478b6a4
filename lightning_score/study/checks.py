"""Check a whole study configuration before any work starts.

Rows (mode, method, options, α), fine-tuning settings, seeds, the α search, the model name, the weights,
the template set, the data root, its domains and targets, the precision and the accelerator: each bad
value ends the study within seconds, with one message that names the setting and the fix, never after the
experts have been fine-tuned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip

import lightning_score.models  # noqa: F401  (registers the tiny open_clip configs)
from lightning_score.data import DomainDataModule
from lightning_score.data.builtin import builtin_name, get_builtin
from lightning_score.merge_module.alpha import ALPHA_SEARCHES
from lightning_score.merging import get_method
from lightning_score.models import load_templates
from lightning_score.models.factory import check_model_name
from lightning_score.study.config import check_rows

__all__ = ["check_study"]


def _check_numbers(study: Any) -> None:
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {study.seeds}.")
    if any(not isinstance(seed, int) or isinstance(seed, bool) for seed in study.seeds):
        raise ValueError(f"seeds must be integers, got {study.seeds}.")
    for name in ("devices", "num_nodes"):
        value = getattr(study, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer (devices per node, nodes), got {value!r}.")
    world_size = study.devices * study.num_nodes
    if study.expert.batch_size % world_size:
        raise ValueError(
            f"expert.batch_size={study.expert.batch_size} is the global batch of every DDP fit and must be divisible "
            f"by devices × num_nodes = {world_size} (each process loads batch_size / {world_size} images per step)."
        )
    for name in ("eval_batch_size", "proxy_images", "bootstrap"):
        if getattr(study, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(study, name)}.")
    if study.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {study.num_workers}.")
    if not 0.0 <= study.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {study.val_fraction}.")
    if study.alpha_images is not None and study.alpha_images < 1:
        raise ValueError(
            f"alpha_images must be at least 1 (or null: every validation image), got {study.alpha_images}."
        )
    if study.alpha_search not in ALPHA_SEARCHES:
        raise ValueError(f"alpha_search={study.alpha_search!r}: choose one of {list(ALPHA_SEARCHES)}.")


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


def _check_rows_against_data(study: Any, data: DomainDataModule, domains: list[str]) -> None:
    """The α search and ESM read the sources' validation data: make sure every domain has some."""
    needs_validation = study.alpha_tuning or any(
        row.alpha == "auto" or (row.mode == "merge" and get_method(row.method).needs_data) for row in study.rows
    )
    if not needs_validation:
        return
    empty = [d for d in domains if not data.split(d).val]
    if empty:
        raise ValueError(
            f"Domains {empty} of '{study.root}' have no validation images, which the α search and ESM read from the "
            "source domains. Set val_fraction > 0 (carve them from the train splits), or alpha_tuning: false and no "
            "ESM or alpha: auto rows."
        )


def check_study(study: Any) -> tuple[list[str], list[str], list[str], str | None]:
    """Validate a :class:`~lightning_score.study.runner.Study`'s settings, cheapest first.

    Returns:
        The domains, the targets, the class names and the dataset's own template set.

    Raises:
        ValueError: The first bad setting, named, with the fix (``FileNotFoundError`` for a missing data root).
    """
    check_rows(study.rows, study.alpha_tuning)
    study.expert.check()
    _check_numbers(study)
    _check_model(study.model_name, study.pretrained, study.templates)
    data = DomainDataModule(
        study.root, num_workers=0, val_fraction=study.val_fraction, split_seed=study.split_seed, preset=study.dataset
    )
    available = data.domains
    domains = _pick(study.domains_arg, "domains", available)
    if len(domains) < 2:
        raise ValueError(f"A leave-one-domain-out study needs at least 2 domains; got {domains}.")
    targets = _pick(study.targets_arg, "targets", domains)
    _check_rows_against_data(study, data, domains)
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
