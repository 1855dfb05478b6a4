"""Files: atomic writes, the cache folder, and the inter-process lock that keeps racing builders from repeating work.

Every file lightning-score writes (task vectors, merged weights, cached heads and bases, results, figures)
goes through :func:`atomic_write`: a temporary file in the destination's folder, then a rename, so an
interrupted write never leaves a half-written file under the final name, and the file gets the permissions
of an ordinary file (``0666`` minus the umask) rather than the owner-only mode of a temporary file. A folder
is published the same way (:func:`atomic_publish_dir`).

Everything lightning-score builds for itself (the rotated-digits folders, the offline base weights, zero-shot
heads) lives under one root, :func:`cache_root`: ``$LIGHTNING_SCORE_CACHE``, default
``~/.cache/lightning_score``. Two processes that race (two DDP ranks, two jobs of a sweep) may both build; the
first rename wins and the loser's copy is discarded. :func:`cache_lock` (a :mod:`filelock` lock under
``<cache>/locks``, released by the OS if its holder dies) lets the slow builders make the second process wait
for the first instead of repeating its work.

A command checks each of its output locations with :func:`ensure_writable` before it starts the work, so an
unwritable folder is one line naming it (:class:`OutputNotWritableError`), not a traceback after the work.
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

import filelock

__all__ = [
    "CACHE_ENV",
    "OutputNotWritableError",
    "atomic_publish_dir",
    "atomic_write",
    "atomic_write_text",
    "cache_key",
    "cache_lock",
    "cache_root",
    "check_folder_target",
    "ensure_writable",
    "lock_holder",
    "ordinary_mode",
    "publish_folder",
]

log = logging.getLogger(__name__)

CACHE_ENV = "LIGHTNING_SCORE_CACHE"


def ordinary_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file (or folder) under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


class OutputNotWritableError(OSError):
    """An output location cannot be written; the message (one line) names it, why, and the fix.

    It survives pickling (a rank that checked sends it to the others, which raise the same error).

    Attributes:
        path: The location as given (None only when not given).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def ensure_writable(path: str | os.PathLike, *, what: str) -> Path:
    """Check that ``path`` can be written, the way :func:`atomic_write` will write it, before any work is done.

    An existing folder is a folder outputs go into: a file is created and removed in it. Anything else is
    the destination of a file (or a folder still to be made): its missing parent folders are created, as
    the real write creates them, and a file is created and removed in its parent. Creating the file is the
    honest test: it fails exactly when the write would (permissions, another owner, a read-only or immutable
    folder, a parent that is a file), whoever runs it, root included.

    Args:
        path: The output file or folder.
        what: What it is, for the message (e.g. ``"--output"``, ``"the task-vector folder"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputNotWritableError: With the one-line message
            ``f"{what} {path} is not writable: {reason}; choose another location or fix its permissions"``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> ensure_writable(folder / "new" / "a.safetensors", what="--output") == folder / "new" / "a.safetensors"
        True
        >>> sorted(p.name for p in (folder / "new").iterdir())  # nothing is left behind
        []
        >>> (folder / "file").write_text("")
        0
        >>> ensure_writable(folder / "file" / "a.safetensors", what="--output")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_score.utilities.files.OutputNotWritableError: --output .../file/a.safetensors is not writable: ...
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _not_writable(what, path, f"{_first_non_folder(folder)} is a file, not a folder") from None
    except OSError as error:
        raise _not_writable(what, path, f"cannot create the folder {folder} ({error.strerror or error})") from None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name or 'output'}.", suffix=".check", dir=folder)
    except OSError as error:
        raise _not_writable(what, path, f"cannot create a file in {folder} ({error.strerror or error})") from None
    os.close(fd)
    os.unlink(name)
    return path


def _not_writable(what: str, path: Path, reason: str) -> OutputNotWritableError:
    message = f"{what} {path} is not writable: {reason}; choose another location or fix its permissions"
    return OutputNotWritableError(message, path)


def _first_non_folder(folder: Path) -> Path:
    """The first of ``folder`` and its ancestors that exists but is not a folder (``folder`` if none is)."""
    for candidate in (*reversed(folder.parents), folder):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return folder


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` creates a temporary file next to it, which is then renamed.

    Args:
        path: The destination; parent folders are created.
        write: Called with the temporary path; must create the file there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", lambda tmp: tmp.write_text("done")).read_text()
        'done'
        >>> sorted(p.name for p in folder.iterdir())  # no temporary file left beside it
        ['a.txt']
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


def check_folder_target(
    target: Path, *, overwrite: bool, what: str = "The folder", fix: str = "pass overwrite=True to replace it"
) -> None:
    """Refuse what :func:`publish_folder` refuses: a file, or (without ``overwrite``) a folder that is not empty.

    Call it before long work whose result goes there (``lightning-score merge --export``), so that the refusal
    comes first; ``fix`` says how to replace a non-empty one in the caller's terms.

    Raises:
        FileExistsError: Naming ``what`` and ``target``.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{what} '{target}' is a file: choose a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{what} '{target}' exists and is not empty: {fix}, or choose a new folder.")


def publish_folder(target: Path, build: Callable[[Path], None], *, overwrite: bool, what: str = "The folder") -> None:
    """Build a folder under a temporary name beside ``target``, then rename it to ``target`` (an export, a copy).

    ``what`` names the folder in errors ("The export folder"). A file, or an existing non-empty ``target`` without
    ``overwrite``, is refused (:func:`check_folder_target`); with ``overwrite`` it is replaced only once the new
    folder is complete (until then, and if the build fails, it stays as it was). Parent folders this call creates
    are removed again if the build fails.
    """
    check_folder_target(target, overwrite=overwrite, what=what)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    ensure_writable(target.parent if target.is_dir() else target, what=what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    aside: Path | None = None
    try:
        build(tmp)
        os.chmod(tmp, ordinary_mode(directory=True))
        if target.is_dir() and any(target.iterdir()):  # overwrite: set the old one aside, not deleted yet
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside)
        elif target.is_dir():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not target.exists():
            os.replace(aside, target)
            aside = None
        for folder in created:
            with contextlib.suppress(OSError):  # another process wrote there: kept
                folder.rmdir()
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named ``name`` (the file ``<cache>/locks/<name>.lock``).

    A :class:`filelock.FileLock`: the operating system releases it when its holder dies, so a killed build
    never blocks the next one.
    """
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(lock_dir / f"{name}.lock")):
        yield


def lock_holder(lock_path: str | os.PathLike[str]) -> str:
    """Who holds a :mod:`filelock` lock, for a message: a live process here (pid and command), or another host.

    When no process on this host holds it, another host sharing the filesystem does (e.g. another cluster job).
    The operating system releases such a lock the moment its holder exits, even when killed, so a held lock always
    means a live holder, and deleting the lock file would not free it (it would only let a second process lock a
    new file beside the held one). Linux lists the holders of every lock in ``/proc/locks``; elsewhere the
    holder is not named.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.lock"
        >>> with filelock.FileLock(str(path)):
        ...     lock_holder(path) == f"process {os.getpid()} on this host ({_command(os.getpid())})"
        True
    """
    try:
        stat = os.stat(lock_path)
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return "another live process (on this host, or on another host sharing this filesystem)"
    wanted = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a process waiting for the lock, not holding it
            continue
        try:
            pid, (major, minor, inode) = int(fields[4]), fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted and pid > 0:
                return f"process {pid} on this host ({_command(pid)})"
        except (IndexError, ValueError):
            continue
    return "a process on another host sharing this filesystem (no process on this host holds it)"


def _command(pid: int) -> str:
    """A process's command line, shortened, or ``"command unknown"``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    if len(command) > 120:
        command = command[:117] + "..."
    return command or "command unknown"
