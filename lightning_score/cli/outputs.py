"""Where a command's run will write, checked writable before any work (one line naming an unwritable one).

A LightningCLI run writes its resolved config (to the log folder), its loggers' files, the checkpoints of a
fit and, with a :class:`~lightning_score.ScoreMergeCallback`, the task vector and θ₀. Lightning creates
those folders only at setup or at the end of the fit, so an unwritable one used to surface as a traceback
after the work; :func:`check_outputs` tries each with
:func:`~lightning_score.utilities.files.ensure_writable` first (an
:class:`~lightning_score.utilities.files.OutputNotWritableError` naming it, which the command prints as one
line, exit status 2).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch import Trainer

from lightning_score.utilities.files import ensure_writable

__all__ = ["check_outputs", "output_locations", "writable_until_done"]


def _local(path: object) -> Path | None:
    """A local folder, or None for no folder or a remote one (``s3://``: not checked here)."""
    return None if path is None or "://" in str(path) else Path(str(path))


def output_locations(trainer: Trainer, stage: str) -> list[tuple[str, Path]]:
    """The folders a run of ``stage`` (``fit``, ``test``, ...) writes into, each with what it is, in order.

    Args:
        trainer: The run's Trainer, before the run.
        stage: The subcommand; checkpoints and task vectors are written by ``fit`` only.

    Returns:
        ``(what, folder)`` pairs: what names the argument that sets the folder, for the message.
    """
    root = Path(trainer.default_root_dir)
    uses_root = not trainer.loggers or trainer.loggers[0].save_dir is None  # the config (and checkpoints) go there
    locations: list[tuple[str, Path]] = []
    for logger in trainer.loggers:  # logs, and the resolved config in the first one's folder
        folder = _local(getattr(logger, "root_dir", None) or logger.save_dir)
        if folder is None:
            continue
        if _local(logger.save_dir) == root:  # Lightning's default logger: under default_root_dir
            uses_root = True
        else:
            locations.append((f"The {type(logger).__name__}'s save_dir (--trainer.logger)", folder))
    if stage == "fit":
        from lightning_score.callback import ScoreMergeCallback  # here: the command's start-up stays Lightning's

        for checkpoint in trainer.checkpoint_callbacks:
            folder = _local(getattr(checkpoint, "dirpath", None))
            if folder is not None:
                locations.append(("ModelCheckpoint's dirpath", folder))
        for callback in trainer.callbacks:
            if isinstance(callback, ScoreMergeCallback):
                folder = callback._folder(trainer)  # dirpath, else <default_root_dir>/task_vectors
                locations.append(("ScoreMergeCallback's dirpath (the task-vector folder)", folder))
                if folder.is_dir():  # θ₀ goes to its pretrained/ subfolder
                    locations.append(("ScoreMergeCallback's θ₀ folder", folder / "pretrained"))
    if uses_root and not (stage == "merge" and not trainer.loggers):  # a merge's config goes beside its weights
        locations.insert(0, ("--trainer.default_root_dir", root))
    return locations


def check_outputs(trainer: Trainer, stage: str) -> None:
    """Check that every folder a run of ``stage`` writes into is writable, before the run.

    Raises:
        OutputNotWritableError: The first that is not, named with the argument that sets it.
    """
    for what, folder in output_locations(trainer, stage):
        ensure_writable(folder, what=what)


@contextlib.contextmanager
def writable_until_done(path: str | os.PathLike[str], *, what: str) -> Iterator[Path]:
    """Check ``path`` writable before the work inside; if the work fails, remove the folders the check made.

    :func:`~lightning_score.utilities.files.ensure_writable` creates the missing parent folders (as the
    write will); a run that then fails on its inputs leaves no empty output folder behind.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> try:
        ...     with writable_until_done(folder / "merged" / "score.safetensors", what="--output"):
        ...         raise ValueError("a missing task vector")
        ... except ValueError:
        ...     pass
        >>> list(folder.iterdir())
        []
    """
    path = Path(path)
    missing = []
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            break
        missing.append(folder)  # deepest first
    ensure_writable(path, what=what)
    try:
        yield path
    except BaseException:
        for folder in missing:
            with contextlib.suppress(OSError):  # not empty (another process wrote there): kept
                folder.rmdir()
        raise
