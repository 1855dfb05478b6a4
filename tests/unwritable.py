"""A folder nobody can write to, even root: ``chattr +i`` (immutable) where it works, else mode 0555 as non-root.

We run the suite as root, whom modes do not stop; an immutable folder stops every user. Where neither works (root
on a file system without ``chattr``), the test that needs it is skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["unwritable_folder"]


@contextlib.contextmanager
def unwritable_folder(folder: Path) -> Iterator[str]:
    """Make ``folder`` (created) unwritable for the duration; yields the reason the OS will give (``strerror``)."""
    folder.mkdir(parents=True, exist_ok=True)
    chattr = shutil.which("chattr")
    if chattr is not None and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield "Operation not permitted"
        finally:
            subprocess.run([chattr, "-i", str(folder)], check=True)
        return
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder unwritable here (root, and no chattr +i)")
        yield "Permission denied"
    finally:
        folder.chmod(0o755)
