"""factor_files: an expert's factors as a safetensors file, and FactorStore, the one object a cache visits it by."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import filelock
import pytest
import torch

from lightning_score.merging.factor_files import (
    FactorFile,
    FactorStore,
    device_tag,
    factor_lock,
    factor_path,
    write_factor_file,
)

CPU = torch.device("cpu")
FINGERPRINT = "blake2b:0123456789abcdef0123"


def _triplet(m: int, n: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(torch.randn(m, n, generator=torch.Generator().manual_seed(seed)), full_matrices=False)
    return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()


def _store(path: Path | None, fingerprint: str = FINGERPRINT, dtype: torch.dtype = torch.float32) -> FactorStore:
    return FactorStore(path, fingerprint, CPU, dtype)


# --- names and headers ------------------------------------------------------------------------------------


def test_the_path_hashes_content_device_and_dtype(tmp_path: Path) -> None:
    beside = tmp_path / "photo.safetensors"
    path = factor_path(FINGERPRINT, CPU, torch.float32, beside=beside, directory=None)
    assert path is not None and path.parent == tmp_path and path.name.startswith("photo.factors-")
    assert path != factor_path(FINGERPRINT, CPU, torch.float64, beside=beside, directory=None)
    assert path != factor_path("blake2b:other", CPU, torch.float32, beside=beside, directory=None)
    folder = factor_path(FINGERPRINT, CPU, torch.float32, beside=beside, directory=tmp_path / "f")
    assert (
        folder is not None and folder.parent == tmp_path / "f" and folder.name.startswith("factors-0123456789abcdef-")
    )
    assert factor_path(FINGERPRINT, CPU, torch.float32, beside=None, directory=None) is None
    assert device_tag(CPU) == f"cpu|torch {torch.__version__}"


def test_a_file_is_read_only_for_its_own_content_device_and_dtype(tmp_path: Path) -> None:
    path = write_factor_file(tmp_path / "f.safetensors", FINGERPRINT, CPU, torch.float32, {"w": _triplet(6, 4, 2)})
    assert FactorFile(path, FINGERPRINT, CPU, torch.float32).ranks == {"w": 2}
    with pytest.raises(ValueError, match=r"f\.safetensors' holds factors of .*blake2b:other"):
        FactorFile(path, "blake2b:other", CPU, torch.float32)
    with pytest.raises(ValueError, match="holds factors of .*torch.float64"):
        FactorFile(path, FINGERPRINT, CPU, torch.float64)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.safetensors' is not a readable factor file"):
        FactorFile(tmp_path / "bad.safetensors", FINGERPRINT, CPU, torch.float32)


# --- FactorStore ---------------------------------------------------------------------------------------------


def test_a_round_trip_gives_back_the_same_bits(tmp_path: Path) -> None:
    entries = {"w": _triplet(6, 4, 3), "v": _triplet(3, 8, 1, seed=1)}
    store = _store(tmp_path / "e.safetensors")
    assert store.ranks == {} and store.rank("w") == 0
    assert store.write(entries) == 2
    assert store.ranks == {"w": 3, "v": 1}  # opened again by the write
    again = _store(tmp_path / "e.safetensors")  # another process
    for key, triplet in entries.items():
        for got, want in zip(again.read(key), triplet, strict=True):
            assert torch.equal(got, want) and got.device.type == "cpu"
    with pytest.raises(KeyError, match="holds no factors of key 'u'"):
        again.read("u")


def test_a_rewrite_keeps_what_the_file_holds_more_of_and_adds_the_rest(tmp_path: Path) -> None:
    store = _store(tmp_path / "e.safetensors")
    longer, shorter = _triplet(6, 4, 3), _triplet(6, 4, 1, seed=2)
    store.write({"w": longer, "kept": _triplet(2, 2, 2)})
    assert store.write({"w": shorter, "new": _triplet(5, 3, 2)}) == 3
    assert store.ranks == {"w": 3, "kept": 2, "new": 2}
    assert torch.equal(store.read("w")[0], longer[0])  # the file held more triplets of "w": it keeps them
    store.write({"w": _triplet(6, 4, 4, seed=3)})
    assert store.rank("w") == 4  # now the entry holds more: it replaces the file's


@pytest.mark.parametrize("damage", ["garbage", "foreign"])
def test_a_damaged_or_foreign_file_counts_as_none_and_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "e.safetensors"
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:
        write_factor_file(path, "blake2b:someone-else", CPU, torch.float32, {"w": _triplet(6, 4, 2)})
    with caplog.at_level(logging.WARNING):
        store = _store(path)
    assert "Ignoring factor file" in caplog.text and "e.safetensors" in caplog.text
    assert store.ranks == {} and store.rank("w") == 0
    store.write({"v": _triplet(3, 3, 1)})
    assert store.ranks == {"v": 1} and FactorFile(path, FINGERPRINT, CPU, torch.float32).ranks == {"v": 1}


def test_locked_reads_what_another_process_wrote_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    store = _store(path)
    _store(path).write({"w": _triplet(6, 4, 2)})  # another process, after this one opened the file
    assert store.rank("w") == 0
    with store.locked(timeout=5):
        assert store.rank("w") == 2
        store.write({"v": _triplet(3, 3, 1)})
    assert store.ranks == {"w": 2, "v": 1}


def test_a_held_lock_times_out_naming_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    held = filelock.FileLock(str(path) + ".lock")
    wanted = rf"e\.safetensors\.lock': it is held by process {os.getpid()} on this host .*do not delete the lock file"
    with held, pytest.raises(TimeoutError, match=wanted), _store(path).locked(timeout=0.1):
        pass
    with factor_lock(path, timeout=1):  # released: free again
        pass


def test_a_store_without_a_path_holds_nothing_and_writes_nothing() -> None:
    store = _store(None)
    assert store.ranks == {} and store.rank("w") == 0
    with pytest.raises(KeyError):
        store.read("w")
    with pytest.raises(ValueError, match="have no file to write"):
        store.write({"w": _triplet(2, 2, 1)})
    with pytest.raises(ValueError, match="have no file to lock"), store.locked(1):
        pass


def test_a_lock_held_by_another_live_process_names_it_and_is_free_once_it_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    lock = f"{path}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(120)", lock],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError) as caught, factor_lock(path, timeout=0.2):
            pass
        message = str(caught.value)
        assert f"'{lock}': it is held by process {holder.pid} on this host (" in message
        assert f"on this host ({sys.executable} -c import filelock" in message  # its command line
        assert "do not delete the lock file" in message and "FactorCache(lock_timeout=...)" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with factor_lock(path, timeout=5):  # the holder died: the OS released its lock, the file is still there
        assert Path(lock).exists()


def test_a_file_without_digests_is_ignored_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = write_factor_file(tmp_path / "e.safetensors", FINGERPRINT, CPU, torch.float32, {"w": _triplet(6, 4, 2)})
    with safe_open(str(path), framework="pt") as handle:  # as version 1 wrote it: no digests
        header = {k: v for k, v in handle.metadata().items() if k != "digests"} | {"format_version": "1"}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(ValueError, match=r"e\.safetensors' was written without a digest of its tensors"):
        FactorFile(path, FINGERPRINT, CPU, torch.float32)
    with caplog.at_level(logging.WARNING):
        store = _store(path)
    assert store.ranks == {} and "computed again and replaced" in caplog.text
    store.write({"w": _triplet(6, 4, 2)})
    assert FactorFile(path, FINGERPRINT, CPU, torch.float32).ranks == {"w": 2}
