"""Atomic writes, the cache folder and its lock (``lightning_score.utilities.files``), beyond ``test_files.py``."""

from __future__ import annotations

import os
import queue
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_score.utilities.files import (
    CACHE_ENV,
    atomic_write,
    atomic_write_text,
    cache_key,
    cache_root,
)

REPO = Path(__file__).resolve().parents[2]
LOCK_TIMEOUT = 60.0  # seconds a child may take to start and report (a loaded machine); a hang fails, not blocks


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic_write ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_writer_that_raises_leaves_no_file_and_no_temporary(tmp_path: Path, error: BaseException) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "merged.safetensors", write)
    assert _names(tmp_path) == []


def test_a_failed_write_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_text("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_text() == "old" and _names(tmp_path) == ["results.json"]


def test_an_existing_file_is_replaced_by_a_rename_never_written_in_place(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    path.write_text("old")
    old_inode = path.stat().st_ino
    seen_during_write = []

    def write(tmp: Path) -> None:
        assert tmp.parent == path.parent and tmp != path  # a temporary beside it (same file system)
        tmp.write_text("new")
        seen_during_write.append(path.read_text())  # a reader meanwhile sees the whole old file

    with open(path) as reader_of_the_old_file:
        assert atomic_write(path, write) == path
        assert reader_of_the_old_file.read() == "old"  # an open reader keeps its whole file
    assert seen_during_write == ["old"]
    assert path.read_text() == "new" and path.stat().st_ino != old_inode
    assert _names(tmp_path) == ["merged.safetensors"]


def test_parents_are_created_and_the_path_returned(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c.txt"
    result = atomic_write(str(path), lambda tmp: tmp.write_text("x"))
    assert result == path and isinstance(result, Path) and path.read_text() == "x"


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_the_file_gets_ordinary_permissions_not_a_temporary_files(
    tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    os.umask(mask)
    path = atomic_write(tmp_path / "tv.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    assert stat.S_IMODE(path.stat().st_mode) == mode  # mkstemp alone would give 0o600
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert stat.S_IMODE(reference.stat().st_mode) == mode  # what open() gives a new file


def test_atomic_write_text_round_trips_utf8(tmp_path: Path) -> None:
    text = "θ₀ + α·τ → merged\nline two\n"
    path = atomic_write_text(tmp_path / "notes.md", text)
    assert path.read_text(encoding="utf-8") == text
    assert path.read_bytes() == text.encode("utf-8")  # UTF-8 whatever the locale
    atomic_write_text(path, "shorter")
    assert path.read_text(encoding="utf-8") == "shorter" and _names(tmp_path) == ["notes.md"]


# --- cache_root and cache_key ---------------------------------------------------------------------------


def test_cache_root_follows_the_environment_variable_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "one"))
    assert cache_root() == tmp_path / "one"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "two"))
    assert cache_root() == tmp_path / "two"
    monkeypatch.setenv(CACHE_ENV, "~/scratch")
    assert cache_root() == tmp_path / "home" / "scratch"
    for unset in (monkeypatch.delenv, lambda name: monkeypatch.setenv(name, "")):
        unset(CACHE_ENV)
        assert cache_root() == tmp_path / "home" / ".cache" / "lightning_score"
    assert CACHE_ENV == "LIGHTNING_SCORE_CACHE"


def test_cache_key_is_stable_across_processes() -> None:
    parts = ("digits", {"steps": 25, "model": "tiny"}, [1, 2])
    key = cache_key(*parts)
    assert key == "8d71e86076609d84"  # names of folders already in users' caches
    code = f"from lightning_score.utilities.files import cache_key; print(cache_key(*{parts!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == key, other.stderr


def test_cache_key_is_order_and_type_sensitive_but_not_to_dict_order() -> None:
    assert cache_key("a", "b") == cache_key("a", "b")
    assert cache_key("a", "b") != cache_key("b", "a")
    assert cache_key([1, 2]) != cache_key([2, 1])
    assert cache_key(1) != cache_key("1") != cache_key(1.5)
    assert cache_key({"x": 1, "y": 2}) == cache_key({"y": 2, "x": 1})  # a mapping has no order
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in (cache_key(), cache_key(None)))
    with pytest.raises(TypeError):
        cache_key(object())  # not JSON: refused, not hashed by identity


# --- cache_lock ----------------------------------------------------------------------------------------

HOLDER = """
import sys
from lightning_score.utilities.files import cache_lock
with cache_lock("digits-base"):
    print("held", flush=True)
    sys.stdin.readline()
"""

WAITER = """
from lightning_score.utilities.files import cache_lock
print("trying", flush=True)
with cache_lock("digits-base"):
    print("got", flush=True)
"""


class _Process:
    """A Python child with the worktree on its path and the cache at ``cache``; its stdout lines in a queue."""

    def __init__(self, code: str, cache: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), CACHE_ENV: str(cache)}
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:  # type: ignore[union-attr]
            self.lines.put(line.strip())

    def expect(self, line: str, timeout: float = LOCK_TIMEOUT) -> None:
        assert self.lines.get(timeout=timeout) == line

    def silent_for(self, seconds: float) -> bool:
        try:
            self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=60)


@pytest.fixture
def processes() -> Iterator[list[_Process]]:
    started: list[_Process] = []
    yield started
    for process in started:
        process.stop()


def test_cache_lock_makes_a_second_process_wait_for_the_first(tmp_path: Path, processes: list[_Process]) -> None:
    holder = _Process(HOLDER, tmp_path)
    processes.append(holder)
    holder.expect("held")
    waiter = _Process(WAITER, tmp_path)
    processes.append(waiter)
    waiter.expect("trying")
    assert waiter.silent_for(1.5) and waiter.popen.poll() is None  # blocked on the lock
    holder.popen.stdin.write("\n")  # type: ignore[union-attr]  # the holder finishes its build
    holder.popen.stdin.flush()  # type: ignore[union-attr]
    waiter.expect("got")
    assert holder.popen.wait(timeout=LOCK_TIMEOUT) == 0 and waiter.popen.wait(timeout=LOCK_TIMEOUT) == 0
    assert (tmp_path / "locks").is_dir()  # the lock lives in the cache


def test_cache_lock_is_released_when_its_holder_is_killed(tmp_path: Path, processes: list[_Process]) -> None:
    holder = _Process(HOLDER, tmp_path)
    processes.append(holder)
    holder.expect("held")
    holder.popen.kill()  # a build killed half-way
    holder.popen.wait(timeout=LOCK_TIMEOUT)
    waiter = _Process(WAITER, tmp_path)
    processes.append(waiter)
    waiter.expect("trying")
    waiter.expect("got")
    assert waiter.popen.wait(timeout=LOCK_TIMEOUT) == 0


def test_a_lock_of_another_name_is_not_held_up(tmp_path: Path, processes: list[_Process]) -> None:
    holder = _Process(HOLDER, tmp_path)
    processes.append(holder)
    holder.expect("held")  # "digits-base" is held for as long as the test runs
    other = _Process(WAITER.replace('"digits-base"', '"rotated-digits"'), tmp_path)
    processes.append(other)
    other.expect("trying")
    other.expect("got", timeout=LOCK_TIMEOUT)  # would wait for the holder if the names shared one lock
    assert other.popen.wait(timeout=LOCK_TIMEOUT) == 0 and holder.popen.poll() is None
    assert _names(tmp_path / "locks") == ["digits-base.lock", "rotated-digits.lock"]
