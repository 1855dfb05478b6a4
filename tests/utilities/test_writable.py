"""``ensure_writable``: an unwritable output location is one line naming it, found before any work, for any user.

We run as root, whom modes do not stop: the unwritable cases are a parent that is a regular file, a folder made
immutable (``chattr +i``, which stops root too), and folders checked by another user (a forked child that
``setuid``s to an unused uid before it checks).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from lightning_score.utilities.files import OutputNotWritableError, ensure_writable
from tests.unwritable import unwritable_folder

OTHER_UID = 12345


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_writable_location_is_returned_and_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert ensure_writable(tmp_path / "out", what="the folder") == tmp_path / "out"
    assert (
        ensure_writable(str(tmp_path / "out" / "a.safetensors"), what="--output") == tmp_path / "out" / "a.safetensors"
    )
    assert _names(tmp_path / "out") == []  # the probe file is removed


def test_missing_parent_folders_are_created_as_the_write_would(tmp_path: Path) -> None:
    ensure_writable(tmp_path / "a" / "b" / "score.safetensors", what="--output")
    assert (tmp_path / "a" / "b").is_dir() and _names(tmp_path / "a" / "b") == []


@pytest.mark.parametrize("under", ["file", "file/deeper"])
def test_a_parent_that_is_a_file_is_named(tmp_path: Path, under: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / under / "score.safetensors"
    with pytest.raises(OutputNotWritableError) as raised:
        ensure_writable(target, what="--output")
    assert str(raised.value) == (
        f"--output {target} is not writable: {tmp_path / 'file'} is a file, not a folder; "
        "choose another location or fix its permissions"
    )
    assert isinstance(raised.value, OSError) and raised.value.path == target
    copy = pickle.loads(pickle.dumps(raised.value))  # what one rank sends the others
    assert type(copy) is OutputNotWritableError and str(copy) == str(raised.value) and copy.path == target
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_immutable_folder_is_refused_even_for_root(tmp_path: Path) -> None:
    folder = tmp_path / "frozen"
    target = folder / "score.safetensors"
    with unwritable_folder(folder) as reason, pytest.raises(OutputNotWritableError) as raised:
        ensure_writable(target, what="--output")
    assert str(raised.value) == (
        f"--output {target} is not writable: cannot create a file in {folder} ({reason}); "
        "choose another location or fix its permissions"
    )
    assert _names(folder) == []


def _check_as_other_user(target: Path) -> str | None:
    """``ensure_writable(target)`` in a forked child run by ``OTHER_UID`` (by us when we are not root): its message.

    A fork, not a fresh interpreter: another user may not be able to read the interpreter's own files.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
            try:
                ensure_writable(target, what="--output")
                message = None
            except OutputNotWritableError as error:
                message = str(error)
            os.write(write, json.dumps(message).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not check"
    return json.loads(output)


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_a_folder_of_another_user_is_refused_naming_it(shared: Path) -> None:
    theirs = shared / "theirs"
    theirs.mkdir(mode=0o755)  # the first user's folder: readable by all, writable by its owner only
    theirs.chmod(0o755)
    if os.geteuid() != 0:
        theirs.chmod(0o555)  # not root: we are the owner, so take our own write permission instead
    mine = shared / "mine"
    mine.mkdir()
    if os.geteuid() == 0:
        os.chown(mine, OTHER_UID, OTHER_UID)

    target = theirs / "score.safetensors"
    assert _check_as_other_user(target) == (
        f"--output {target} is not writable: cannot create a file in {theirs} (Permission denied); "
        "choose another location or fix its permissions"
    )
    nested = theirs / "new" / "score.safetensors"
    assert _check_as_other_user(nested) == (
        f"--output {nested} is not writable: cannot create the folder {theirs / 'new'} (Permission denied); "
        "choose another location or fix its permissions"
    )
    assert _check_as_other_user(mine / "score.safetensors") is None
    assert _names(theirs) == [] and _names(mine) == []
