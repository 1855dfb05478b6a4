"""callback.snapshot: θ₀ written once per content to ``<folder>/pretrained/<fingerprint>.safetensors``, read back lazily."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_score import TaskVector
from lightning_score.callback import snapshot as snapshot_module
from lightning_score.callback.snapshot import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_KIND,
    read_snapshot,
    snapshot_fingerprint,
    write_snapshot,
)
from lightning_score.task_vector import state_dict_fingerprint
from lightning_score.utilities.tensor_files import LazySafetensors


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g).to(torch.bfloat16),
        "scale": torch.tensor(2.5, dtype=torch.float64),
    }


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    written: list[Path] = []
    real = snapshot_module.atomic_write

    def counting(path: Path, write: object) -> None:
        written.append(Path(path))
        real(path, write)

    monkeypatch.setattr(snapshot_module, "atomic_write", counting)
    return written


def test_write_names_the_file_after_its_content_and_keeps_each_dtype(tmp_path: Path) -> None:
    state = _state()
    path, fingerprint = write_snapshot(state, tmp_path)
    assert fingerprint == state_dict_fingerprint(state, list(state))
    assert path == tmp_path / "pretrained" / f"{fingerprint.replace(':', '-')}.safetensors"
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == [path.name]  # no temporary left behind
    back = read_snapshot(path)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_write_records_the_format_its_version_and_the_fingerprint(tmp_path: Path) -> None:
    path, fingerprint = write_snapshot(_state(), tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header == {"format": SNAPSHOT_FORMAT, "format_version": str(SNAPSHOT_KIND.version),
                      "fingerprint": fingerprint}  # fmt: skip
    assert SNAPSHOT_FORMAT == "lightning-score/pretrained-snapshot" and SNAPSHOT_KIND.version == 1
    assert snapshot_fingerprint(path) == fingerprint


def test_an_identical_snapshot_is_reused_and_other_content_gets_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _count_writes(monkeypatch)
    first, fingerprint = write_snapshot(_state(), tmp_path)
    mtime = first.stat().st_mtime_ns
    again, same = write_snapshot({k: v.clone() for k, v in _state().items()}, tmp_path)
    assert (again, same) == (first, fingerprint)
    assert written == [first] and first.stat().st_mtime_ns == mtime  # found, not written again
    other, other_fingerprint = write_snapshot({**_state(), "w": torch.zeros(4, 3)}, tmp_path)
    assert other != first and other_fingerprint != fingerprint
    assert written == [first, other] and len(list((tmp_path / "pretrained").iterdir())) == 2


def test_a_reused_snapshot_whose_content_is_damaged_is_written_again_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    path, fingerprint = write_snapshot(state, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit in the last tensor's bytes; the header still records the fingerprint
    path.write_bytes(bytes(raw))
    assert snapshot_fingerprint(path) == fingerprint
    written = _count_writes(monkeypatch)
    with pytest.warns(UserWarning, match=f"snapshot '{path}' cannot be reused .*is damaged.*written again from"):
        assert write_snapshot(state, tmp_path) == (path, fingerprint)
    assert written == [path]
    back = read_snapshot(path, fingerprint, verify=True)
    assert all(torch.equal(back[key], value) for key, value in state.items())


def test_a_file_in_the_way_that_is_not_that_snapshot_is_replaced(tmp_path: Path) -> None:
    state = _state()
    fingerprint = state_dict_fingerprint(state, list(state))
    path = tmp_path / "pretrained" / f"{fingerprint.replace(':', '-')}.safetensors"
    path.parent.mkdir()
    path.write_text("half a file from a killed run")
    assert write_snapshot(state, tmp_path) == (path, fingerprint)
    assert read_snapshot(path, fingerprint, verify=True)["w"].shape == (4, 3)


def test_tied_weights_are_cloned_so_safetensors_can_write_them(tmp_path: Path) -> None:
    shared = torch.randn(3, 3)
    state = {"embed": shared, "unembed": shared, "row": shared[1]}  # one storage, three entries
    path, fingerprint = write_snapshot(state, tmp_path)
    back = read_snapshot(path, fingerprint, verify=True)
    assert torch.equal(back["embed"], shared) and torch.equal(back["unembed"], shared)
    assert torch.equal(back["row"], shared[1])
    assert shared.untyped_storage().data_ptr() == state["embed"].untyped_storage().data_ptr()  # input untouched


def test_read_is_lazy_and_checks_a_given_fingerprint(tmp_path: Path) -> None:
    path, fingerprint = write_snapshot(_state(), tmp_path)
    state = read_snapshot(path, fingerprint)
    assert isinstance(state, LazySafetensors)  # a tensor is read when indexed, not before
    assert len(state) == 3 and state.tensor_spec("w") == ((4, 3), torch.float32)
    with pytest.raises(ValueError, match=r"holds other weights \(blake2b:.*\) than expected \(blake2b:0000.*\): it "
                                         "was replaced since the checkpoint was written"):  # fmt: skip
        read_snapshot(path, "blake2b:0000")


def test_verify_hashes_the_content_and_detects_a_changed_file(tmp_path: Path) -> None:
    state = _state()
    path, fingerprint = write_snapshot(state, tmp_path)
    assert read_snapshot(path, fingerprint, verify=True)["scale"].item() == 2.5
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    save_file({**state, "w": state["w"] + 1}, str(path), metadata=header)  # same header, other tensors
    assert read_snapshot(path, fingerprint)["w"].shape == (4, 3)  # the header alone still looks right
    with pytest.raises(ValueError, match="is damaged: its content no longer matches its fingerprint"):
        read_snapshot(path, fingerprint, verify=True)


def test_files_that_are_not_a_snapshot_say_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pre-trained snapshot '.*gone.safetensors' does not exist. "
                                                "ScoreMergeCallback writes it"):  # fmt: skip
        read_snapshot(tmp_path / "gone.safetensors")
    with pytest.raises(ValueError, match="is a folder, not a pre-trained snapshot"):
        read_snapshot(tmp_path)
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(ValueError, match=r"is not a safetensors file .*\(never pickles\); it cannot serve as θ₀"):
        read_snapshot(tmp_path / "notes.safetensors")
    task_vector = TaskVector({"w": torch.zeros(2)}, {"name": "x"}).save(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="is a safetensors file but not a lightning-score pre-trained snapshot"):
        read_snapshot(task_vector)
    with pytest.raises(ValueError, match="not a lightning-score pre-trained snapshot"):
        snapshot_fingerprint(task_vector)
    path, fingerprint = write_snapshot(_state(), tmp_path)
    save_file(_state(), str(path), metadata={"format": SNAPSHOT_FORMAT, "format_version": "2",
                                             "fingerprint": fingerprint})  # fmt: skip
    with pytest.raises(ValueError, match="pre-trained snapshot format version 2, newer than this lightning-score"):
        read_snapshot(path)
