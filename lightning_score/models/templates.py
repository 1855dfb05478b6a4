"""Prompt-template sets for zero-shot heads, shipped as JSON files in ``template_sets/``.

Each file holds ``{"name", "description", "domains", "templates"}``; a template has one ``{}`` where the
class name goes. ``domains`` lists the domain folders of the dataset the set was written for, which lets
``templates="auto"`` pick a set from a dataset's domains.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATE_DIR", "guess_template_set", "list_template_sets", "load_templates"]

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
        name: A shipped set's name (see :func:`list_template_sets`) or the path of a ``.json`` file holding
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
    raise ValueError(
        f"Unknown template set {name!r}. Use one of {list_template_sets()}, 'auto', or the path of a .json file "
        'holding {"templates": ["a photo of a {}.", ...]}.'
    )


def _normalise(domain: str) -> str:
    return domain.lower().replace(" ", "_")


def guess_template_set(domains: list[str]) -> str | None:
    """The shipped set written for a dataset with these domain folders, if any.

    A set matches when every given domain is one of its domains (case and ``_``/space insensitive) and at
    least two are given, so leave-one-domain-out subsets of a dataset still match.

    Example:
        >>> guess_template_set(["art_painting", "sketch", "photo"])
        'pacs'
        >>> guess_template_set(["my_domain", "other"]) is None
        True
    """
    wanted = {_normalise(d) for d in domains}
    if len(wanted) < 2:
        return None
    for name in list_template_sets():
        known = {_normalise(d) for d in _read_set(TEMPLATE_DIR / f"{name}.json").get("domains", [])}
        if known and wanted <= known:
            return name
    return None
