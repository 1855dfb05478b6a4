"""Optional dependencies: import one, or fail with the one line that says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it.

    Args:
        module: The import name, e.g. ``"transformers"``.
        extra: The lightning-score extra that installs it, e.g. ``"hf"``.

    Returns:
        The imported module.

    Example:
        >>> require("torch", extra="core").__name__
        'torch'
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but one of its own imports failed: that message is the useful one
        raise MissingExtraError(
            f"{module} is not installed: install the {extra} extra: pip install 'lightning-score[{extra}]'"
        ) from error
