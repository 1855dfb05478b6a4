"""How the command reads YAML configs: jsonargparse's safe loader, with a refused tag named by file and line.

jsonargparse loads configs with PyYAML's safe loader, so a tag that would build a Python object
(``!!python/object/apply:os.system``) is never run; but its refusal reads only ``could not determine a
constructor for the tag …  in "<unicode string>", line 4, column 7``, naming no file. :func:`refuse_yaml_tags`
installs (through jsonargparse's public ``set_loader``) the same loader, whose refusal of a tag is a
:class:`YAMLTagError` saying that tags are not allowed, in which file and on which line.
"""

from __future__ import annotations

import importlib
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader

__all__ = ["YAMLTagError", "refuse_yaml_tags"]

_UNKNOWN_TAG = "could not determine a constructor for the tag"
_STANDARD_PREFIX = "tag:yaml.org,2002:"


class YAMLTagError(yaml.YAMLError):
    """A config holds a YAML tag (``!!python/…``, ``!custom``) that the safe loader does not construct."""


def _loading_file(fallback: str) -> str:
    """The config file jsonargparse is loading, else ``fallback``.

    A file named on the command line is named as given there; a file named inside another config (relative
    to that config's folder) by its absolute path. jsonargparse keeps a stack of the files being loaded in
    ``jsonargparse._util.config_load_stack`` (a ContextVar of ``(real path, path as given)`` pairs); it is
    private, so read with a fallback to the file name jsonargparse passes the loader (pinned by
    ``tests/cli/test_config_files.py``).
    """
    try:
        stack = importlib.import_module("jsonargparse._util").config_load_stack.get()
    except (ImportError, AttributeError, LookupError):
        stack = ()
    if not stack:
        return fallback
    real, given = stack[-1]
    return given if len(stack) == 1 else real


def _tag(problem: str) -> str:
    """``could not determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'`` → ``!!python/…``."""
    tag = problem.partition(_UNKNOWN_TAG)[2].strip().strip("'\"")
    return "!!" + tag[len(_STANDARD_PREFIX) :] if tag.startswith(_STANDARD_PREFIX) else tag


def refuse_yaml_tags() -> None:
    """Make jsonargparse's YAML loader refuse a tag with one line naming the tag, the file and the line. Idempotent.

    What is loaded does not change (the loader is jsonargparse's own); only the message of a refused tag does.
    """
    current = get_loader("yaml")
    if getattr(current, "refuses_yaml_tags", False):
        return

    def load(value: str, path: str = "") -> Any:
        try:
            return current(value)
        except yaml.constructor.ConstructorError as error:
            if _UNKNOWN_TAG not in str(error.problem) or error.problem_mark is None:
                raise
            mark = error.problem_mark
            where = _loading_file(path or "a command-line value")
            raise YAMLTagError(
                f"{where}, line {mark.line + 1}, column {mark.column + 1}: the YAML tag '{_tag(error.problem)}' is "
                "not allowed in a config (tags that build Python objects are never loaded); write the plain "
                "value instead, and a class as class_path: ... with init_args: ..."
            ) from error

    load.refuses_yaml_tags = True  # type: ignore[attr-defined]
    set_loader("yaml", load, exceptions=(yaml.YAMLError,))
