"""How the command reads and writes YAML configs: a refused tag named by file and line; the run's config saved.

jsonargparse loads configs with PyYAML's safe loader, so a tag that would build a Python object
(``!!python/object/apply:os.system``) is never run; but its refusal reads only ``could not determine a
constructor for the tag …  in "<unicode string>", line 4, column 7``, naming no file. :func:`refuse_yaml_tags`
installs (through jsonargparse's public ``set_loader``) the same loader, whose refusal of a tag is a
:class:`YAMLTagError` saying that tags are not allowed, in which file and on which line. :class:`SaveRunConfig`
writes the resolved config of a run where a Lightning user looks for it (:func:`dump_config`: the YAML).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from packaging.version import Version
from typing_extensions import override

from lightning_score.utilities.files import atomic_write_text

__all__ = ["SaveRunConfig", "YAMLTagError", "dump_config", "refuse_yaml_tags"]

log = logging.getLogger(__name__)

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


def dump_config(parser: LightningArgumentParser, config: Namespace) -> str:
    """The whole resolved config as YAML, None values included (what reproduces the run)."""
    if Version(jsonargparse.__version__) >= Version("4.49"):
        return parser.dump(config, skip_unset=False)
    return parser.dump(config, skip_none=False)  # pragma: no cover - older jsonargparse


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config where a Lightning user looks for it: one file per run, or per command.

    With a logger, ``<log_dir>/config.yaml``: the run's own folder (``lightning_logs/version_N``), as
    Lightning's callback does. Without one (``--trainer.logger false``, as the merge and test recipes), the
    log folder is ``default_root_dir``, which every run there shares: the config is
    ``<default_root_dir>/<command>-config.yaml`` (``fit-config.yaml``, ``test-config.yaml``...), replaced by
    the next run of the same command there, so a test never replaces a fit's and nothing piles up; ``merge``
    writes its config beside the merged weights instead (``<output>.yaml``, by :meth:`LightningScoreCLI.after_merge`).
    Lightning's own callback would refuse to start once the file exists.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # written by save_config below
        super().__init__(parser, config, **kwargs)
        #: The config file the last run wrote (None for a merge without a logger: it is beside the weights).
        self.saved_path: Path | None = None
        self.resolved_log_dir: str | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the log folder on every rank (a collective), then save on rank zero."""
        if not self.already_saved:
            self.resolved_log_dir = trainer.log_dir
        super().setup(trainer, pl_module, stage)

    def config_path(self, trainer: Trainer, stage: str) -> Path | None:
        """Where this run's config goes (see the class), or None (a merge without a logger)."""
        command = getattr(self.parser, "command", None) or stage
        if trainer.loggers:
            return Path(self.resolved_log_dir or trainer.default_root_dir) / self.config_filename
        if command == "merge":
            return None
        return Path(trainer.default_root_dir) / f"{command}-{self.config_filename}"

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write the config (rank zero) to :meth:`config_path`."""
        path = self.config_path(trainer, stage)
        if path is not None:
            atomic_write_text(path, dump_config(self.parser, self.config))
            log.debug("lightning-score: saved the resolved config to %s", path)
        self.saved_path = path
