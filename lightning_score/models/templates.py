"""Prompt-template sets for zero-shot heads, shipped as JSON files in ``template_sets/``.

Each file holds ``{"name", "description", "domains", "templates"}``; a template has one ``{}`` where the
class name goes. The defaults are the SCORE authors' sets: ``pacs`` (2 templates), ``imagenet`` (CLIP's 80,
for DomainNet, OfficeHome, ImageNet-R and NICO++), ``terra_incognita``, ``fed_isic2019`` and ``retina``. A
dataset preset's name (``office_home``, ``domainnet``...) also names its dataset's set. Sets whose
templates name domains (``pacs_domains``: "a sketch of a {}."...) are explicit choices only: in a
leave-one-domain-out fold they describe the held-out target, which domain generalization forbids
(:func:`templates_naming_domains` finds such templates).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from lightning_score.data.presets import PRESETS, detect_preset

__all__ = ["TEMPLATE_DIR", "guess_template_set", "list_template_sets", "load_templates", "templates_naming_domains"]

TEMPLATE_DIR = Path(__file__).parent / "template_sets"


@cache
def _read_set(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        body = json.load(handle)
    templates = body.get("templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"Template file '{path}' must hold a non-empty list of strings under 'templates'.")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(
                f"Template {template!r} in '{path}' must contain exactly one '{{}}' where the class name goes."
            )
    return body


def list_template_sets() -> list[str]:
    """The names of the shipped template sets (``imagenet``, ``pacs``, ``digits``, ``medical_retina``...)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_templates(name: str) -> list[str]:
    """The templates of a shipped set, or of a JSON file of the same format.

    Args:
        name: A shipped set's name (see :func:`list_template_sets`), a dataset preset's name (its authors'
            set: ``office_home`` gives ``imagenet``), or the path of a ``.json`` file holding
            ``{"templates": ["a photo of a {}.", ...]}``.

    Returns:
        The templates, each with one ``{}``.

    Example:
        >>> load_templates("simple")
        ['a photo of a {}.']
    """
    shipped = TEMPLATE_DIR / f"{name}.json"
    if shipped.is_file():
        return list(_read_set(shipped)["templates"])
    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():
        return list(_read_set(path.resolve())["templates"])
    if name in PRESETS:
        return load_templates(PRESETS[name].templates)
    raise ValueError(
        f"Unknown template set {name!r}. Use one of {list_template_sets()}, a dataset preset ({list(PRESETS)}), "
        '\'auto\', or the path of a .json file holding {"templates": ["a photo of a {}.", ...]}.'
    )


def _normalise(domain: str) -> str:
    return domain.lower().replace(" ", "_")


def guess_template_set(domains: list[str]) -> str | None:
    """The authors' set for the dataset with these domain folders, if any.

    The dataset preset detected from the domains gives its set
    (:func:`lightning_score.data.presets.detect_preset`); otherwise a shipped set matches when every given
    domain is one of the ``domains`` its file lists (case and ``_``/space insensitive) and at least two are
    given, so leave-one-domain-out subsets still match.

    Example:
        >>> guess_template_set(["art_painting", "sketch", "photo"])
        'pacs'
        >>> guess_template_set(["Art", "Clipart", "Product", "Real World"])
        'imagenet'
        >>> guess_template_set(["my_domain", "other"]) is None
        True
    """
    preset = detect_preset(domains)
    if preset is not None:
        return preset.templates
    wanted = {_normalise(d) for d in domains}
    if len(wanted) < 2:
        return None
    for name in list_template_sets():
        known = {_normalise(d) for d in _read_set(TEMPLATE_DIR / f"{name}.json").get("domains", [])}
        if known and wanted <= known:
            return name
    return None


def _words(text: str) -> str:
    """Lower-case words separated by single spaces (``"Real_World"`` -> ``"real world"``)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.replace("{}", " ").lower()))


def templates_naming_domains(templates: Sequence[str], domains: Sequence[str]) -> dict[str, list[str]]:
    """The templates that name any of ``domains``, with the domains each one names.

    A template names a domain when the domain's name, as words (``art_painting`` -> "art painting", case
    ignored), appears in it as whole words: "an art painting of a {}." names ``art_painting``, "a sketch of
    the {}." names ``sketch``, "a painting of a {}." names ``painting`` but not ``art_painting``. Use it to
    warn when a prompt describes a held-out target domain. Note that generic sets name common words too:
    the authors' PACS set ("a photo of a {}.") names PACS's ``photo`` domain, and CLIP's 80 ImageNet
    templates name ``sketch``, ``painting``, ``cartoon``... (DomainNet's and ImageNet-R's domains).

    Args:
        templates: Prompt templates, each with one ``{}``.
        domains: Domain names (folder names).

    Returns:
        ``{template: [domains it names]}`` for each template that names at least one, in input order.

    Example:
        >>> templates_naming_domains(["a photo of a {}.", "a sketch of a {}."], ["sketch", "cartoon"])
        {'a sketch of a {}.': ['sketch']}
    """
    named: dict[str, list[str]] = {}
    for template in templates:
        text = f" {_words(template)} "
        hits = [d for d in domains if _words(d) and f" {_words(d)} " in text]
        if hits:
            named[template] = hits
    return named
