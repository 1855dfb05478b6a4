"""The on-disk cache: where built artefacts live, and how to write them safely when processes race.

Everything lightning-score builds for itself (the rotated-digits folders, the offline base weights,
zero-shot heads) lives under one root: ``$LIGHTNING_SCORE_CACHE``, default ``~/.cache/lightning_score``.

Writes are atomic: a file is written to a temporary name in its destination folder and renamed into
place; a folder is built under a temporary name and renamed. A reader therefore sees either nothing or
a complete artefact. Two processes that race (two DDP ranks, two jobs of a sweep) may both build; the
first rename wins and the loser's copy is discarded. :func:`cache_lock` lets the slow builders make the
second process wait for the first instead of repeating its work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_score.atomic import ordinary_mode

__all__ = ["CACHE_ENV", "atomic_publish_dir", "cache_key", "cache_lock", "cache_root"]

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_SCORE_CACHE"


def cache_root() -> Path:
    """The cache folder: ``$LIGHTNING_SCORE_CACHE`` if set, else ``~/.cache/lightning_score``.

    Read on every call, so tests (and users) can redirect it by setting the environment variable.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_score"


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, for file names.

    Example:
        >>> cache_key("a", [1, 2]) == cache_key("a", [1, 2]) != cache_key("a", [2, 1])
        True
    """
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def atomic_publish_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and rename it to ``path``; keep an existing ``path``.

    If ``path`` already exists (another process finished first), the new copy is discarded.

    Args:
        path: The final folder.
        build: Called with an empty temporary folder to fill.

    Returns:
        ``path``.
    """
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        build(tmp)
        os.chmod(tmp, ordinary_mode(directory=True))
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            log.debug("'%s' was published by another process; discarding this copy", path)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named ``name`` (a file under ``<cache>/locks``).

    On platforms without ``fcntl`` this is a no-op; atomic writes still keep the cache consistent,
    at the cost of possibly building twice.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
