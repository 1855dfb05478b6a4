"""Atomic file writes: a temporary file in the destination's folder, then a rename.

Every file lightning-score writes (task vectors, merged weights, cached heads and bases, results, figures)
goes through :func:`atomic_write`, so an interrupted write never leaves a half-written file under the
final name, and the file gets the permissions of an ordinary file (``0666`` minus the umask) rather than
the owner-only mode of a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "ordinary_mode"]


def ordinary_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (or folder) under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` creates a temporary file next to it, which is then renamed.

    Args:
        path: The destination; parent folders are created.
        write: Called with the temporary path; must create the file there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, ordinary_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
