"""The built-in benchmarks: ``root="builtin:<name>"`` for their data, ``pretrained="builtin:<name>"`` for their base.

One registry, one prefix. An entry knows how to materialise its dataset folder (data, this package) and its
prompt-template set; the model layer registers the offline base model pre-trained for it
(:func:`register_base`; :mod:`lightning_score.models.digits_base` does so for ``digits``), so data never imports
models and no module is named in a string.

Example:
    >>> builtin_name("builtin:digits"), builtin_name("/data/PACS")
    ('digits', None)
    >>> get_builtin("builtin:digits").templates
    'digits'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning_score.data.digits import materialise_rotated_digits

__all__ = ["BUILTIN_PREFIX", "Builtin", "builtin_name", "get_builtin", "list_builtins", "register_base"]

BUILTIN_PREFIX = "builtin:"
"""What marks a built-in benchmark's name in ``root`` and ``pretrained``."""


@dataclass(frozen=True)
class Builtin:
    """A built-in benchmark.

    Attributes:
        name: Its name (``root="builtin:<name>"``).
        materialise: Writes its dataset folder into the cache (once) and returns it.
        templates: Its prompt-template set (``templates="auto"`` picks it).
        base: Builds (once, cached) the base model pre-trained for it, ``base(model_name=...) -> weights file``;
            registered by the model layer, ``None`` until then.
    """

    name: str
    materialise: Callable[[], Path]
    templates: str
    base: Callable[..., Path] | None = None


_BUILTINS: dict[str, Builtin] = {"digits": Builtin("digits", materialise_rotated_digits, "digits")}


def builtin_name(value: str | None) -> str | None:
    """The built-in's name when ``value`` is ``"builtin:<name>"`` (known or not), else ``None``."""
    if value is None or not str(value).startswith(BUILTIN_PREFIX):
        return None
    return str(value)[len(BUILTIN_PREFIX) :]


def list_builtins() -> list[str]:
    """Every built-in benchmark, as ``"builtin:<name>"``."""
    return [BUILTIN_PREFIX + name for name in _BUILTINS]


def get_builtin(value: str) -> Builtin:
    """The built-in named ``value`` (``"builtin:digits"`` or ``"digits"``).

    Raises:
        ValueError: No built-in has that name; the message lists them.
    """
    named = builtin_name(value)
    name = value if named is None else named
    if name not in _BUILTINS:
        raise ValueError(f"Unknown built-in {BUILTIN_PREFIX + name!r}; available: {list_builtins()}.")
    return _BUILTINS[name]


def register_base(name: str, build: Callable[..., Path]) -> None:
    """Attach the builder of a built-in benchmark's base model, ``build(model_name=...) -> weights file``."""
    _BUILTINS[name] = dataclasses.replace(get_builtin(name), base=build)
