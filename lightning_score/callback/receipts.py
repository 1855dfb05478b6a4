"""The receipt: a small JSON file listing the files one callback instance's last fit wrote.

Under ``ddp_spawn`` the fit runs in worker processes whose callback state never comes back to the main process;
the receipt is how the main process (and later test workers) find the task vector and the merge. It lives in a
folder of the temporary directory private to the user, ``<tmp>/lightning-score-<uid>`` (mode ``0700``, owned by
the user, not a symbolic link: another user can neither read nor swap a receipt there). When that folder belongs
to someone else or is a link, it is left alone, with a warning, and the receipt goes to a folder of its own,
``<tmp>/lightning-score-<uid>-<token>``, made the same way (the token is random: nobody can make it first).

A receipt is removed once the process that made the callback has read it (it keeps what it read in memory), and
when that callback is garbage-collected or the process exits, so receipts never pile up. A receipt that cannot
be written is a warning, not a failed fit: the fit's own files are written by then.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

from lightning_score.utilities.files import atomic_write_text

__all__ = ["Receipt", "private_folder_problem"]

_PRIVATE = 0o700


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None  # no user ids (Windows): the folder is per-profile


def private_folder_problem(path: Path, create: bool) -> str | None:
    """Make ``path`` a folder only this user can enter (mode ``0700``), or say why it cannot be one.

    Args:
        path: The folder.
        create: Create it (mode ``0700``) when it does not exist.

    Returns:
        None when ``path`` is (now) a folder of this user with mode ``0700``; else why not, e.g. ``"it belongs to
        another user (uid 12345)"``. A folder of this user with a wider mode is narrowed to ``0700``.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=_PRIVATE)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "it does not exist"
    if stat.S_ISLNK(info.st_mode):
        return f"it is a symbolic link (to '{os.readlink(path)}')"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    uid = _uid()
    if uid is not None and info.st_uid != uid:
        return f"it belongs to another user (uid {info.st_uid})"
    if stat.S_IMODE(info.st_mode) != _PRIVATE:
        os.chmod(path, _PRIVATE)  # ours: others must not read or swap what is in it
    return None


def _remove(shared: Path, own: Path) -> None:
    """Remove the receipt wherever it is, and its own folder (``lightning-score-<uid>-<token>``) if it has one."""
    for path in (shared, own):
        with contextlib.suppress(OSError):
            if private_folder_problem(path.parent, create=False) is None:
                path.unlink(missing_ok=True)
                if path is own:
                    path.parent.rmdir()


class Receipt:
    """The files one callback instance's last fit wrote, readable by this user's processes on the machine.

    Args:
        token: Unique per callback instance (it travels with the callback to spawned workers).

    Example:
        >>> receipt = Receipt("doctest")
        >>> receipt.write({"task_vector": "a.safetensors"})
        >>> receipt.read(), receipt.path.exists()  # read by its owner: removed
        ({'task_vector': 'a.safetensors'}, False)
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self._owner = True  # the process that made the callback (a pickled copy in a worker is not)
        self._read: dict[str, Any] | None = None
        weakref.finalize(self, _remove, *self._candidates())  # when the callback is collected, or at exit

    def __getstate__(self) -> dict[str, Any]:
        return {"token": self.token, "_read": self._read}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.token, self._read, self._owner = state["token"], state["_read"], False

    def _candidates(self) -> tuple[Path, Path]:
        folder = Path(tempfile.gettempdir()) / f"lightning-score-{_uid() if _uid() is not None else 'user'}"
        name = f"callback-{self.token}.json"
        return folder / name, folder.with_name(f"{folder.name}-{self.token}") / name

    def _locate(self, create: bool) -> Path:
        shared, own = self._candidates()
        problem = private_folder_problem(shared.parent, create)
        if problem is None or (not create and problem == "it does not exist"):
            return shared
        if create:
            warnings.warn(
                f"ScoreMergeCallback: the receipt folder '{shared.parent}' is not used: {problem}, and it should be "
                f"this user's alone. The receipt goes to '{own.parent}'; remove '{shared.parent}' (or ask its owner "
                "to) so that receipts are kept there.",
                stacklevel=3,
            )
        own_problem = private_folder_problem(own.parent, create)
        if create and own_problem is not None:
            raise PermissionError(f"neither '{shared.parent}' ({problem}) nor '{own.parent}' ({own_problem}) is usable")
        return own

    @property
    def path(self) -> Path:
        """Where the receipt is (or will be written)."""
        return self._locate(create=False)

    def read(self) -> dict[str, Any] | None:
        """The recorded outputs, or None; the process that made the receipt removes the file once read."""
        path = self.path
        try:
            self._read = json.loads(path.read_text())
        except FileNotFoundError:
            return self._read  # read before (by this process, or by the main process before it spawned this one)
        except (OSError, ValueError):
            return None
        if self._owner:
            _remove(*self._candidates())
        return self._read

    def write(self, outputs: dict[str, Any] | None) -> None:
        """Record the outputs (atomically); warn, and record nothing, when the receipt cannot be written."""
        try:
            path = self._locate(create=True)
            atomic_write_text(path, json.dumps(outputs))
        except OSError as error:
            warnings.warn(
                f"ScoreMergeCallback: could not write the receipt of this fit ({error}); the task vector and the "
                "merge are written all the same, but under ddp_spawn the main process will not find them. Set "
                "TMPDIR to a folder of your own.",
                stacklevel=2,
            )

    def forget(self) -> None:
        """A new fit starts: nothing is recorded; a worker says so to the main process (which may have read one)."""
        self._read = None
        if self._owner:
            _remove(*self._candidates())
        else:
            self.write(None)
