"""lightning-score's safetensors files: one message per way a header is wrong, lazy reads, a content hash."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import lightning_score.utilities.tensor_files as tensor_files
from lightning_score.utilities.tensor_files import FileKind, LazySafetensors, read_header, state_dict_fingerprint

KIND = FileKind(
    format="example/format",
    version=2,
    what="example file",
    when_missing="Make one first.",
    when_unreadable="re-create it.",
    make="Write one with save().",
)


def _write(path: Path, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> Path:
    save_file(tensors or {"w": torch.ones(2)}, str(path), metadata=metadata or None)
    return path


# --- read_header ---------------------------------------------------------------------------------------


def test_read_header_returns_the_whole_header_of_a_file_of_its_kind(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", format="example/format", format_version="2", name="rot30")
    assert read_header(path, KIND) == {"format": "example/format", "format_version": "2", "name": "rot30"}
    older = _write(tmp_path / "old.safetensors", format="example/format", format_version="1")
    assert read_header(str(older), KIND)["format_version"] == "1"  # an older version is read; a str path too
    unversioned = _write(tmp_path / "v0.safetensors", format="example/format")
    assert read_header(unversioned, KIND) == {"format": "example/format"}  # no version: version 0


def test_read_header_names_a_missing_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as caught:
        read_header(path, KIND)
    message = str(caught.value)
    assert f"The example file '{path}' does not exist." in message
    assert message.endswith("Make one first.")  # when_missing: what to do


def test_read_header_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        read_header(tmp_path, KIND)
    message = str(caught.value)
    assert f"'{tmp_path}' is a folder" in message and "example file" in message
    assert "pass the path of a .safetensors file" in message


class _Trap:
    """Unpickling this would create ``marker``: the file must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("content", ["text", "empty", "pickle", "torch.save"])
def test_read_header_refuses_what_is_not_safetensors_without_unpickling_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "weights.safetensors"
    marker = tmp_path / "unpickled"
    if content == "text":
        path.write_text("not tensors at all")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "pickle":
        path.write_bytes(pickle.dumps(_Trap(marker)))
    else:
        torch.save({"w": torch.ones(2), "trap": _Trap(marker)}, path)
    with pytest.raises(ValueError) as caught:
        read_header(path, KIND)
    message = str(caught.value)
    assert message.startswith(f"'{path}' is not a safetensors file (")  # then the reader's own error
    assert "reads a example file only from safetensors (never pickles)" in message
    assert message.endswith("(never pickles); re-create it.")
    assert isinstance(caught.value.__cause__, Exception)  # the reader's error is chained, not lost
    assert not marker.exists()


@pytest.mark.parametrize("metadata", [{}, {"format": "lightning-score/task-vector"}, {"name": "no format"}])
def test_read_header_refuses_a_safetensors_file_of_another_format(tmp_path: Path, metadata: dict) -> None:
    path = _write(tmp_path / "other.safetensors", **metadata)
    with pytest.raises(ValueError) as caught:
        read_header(path, KIND)
    message = str(caught.value)
    assert f"'{path}' is a safetensors file but not a lightning-score example file" in message
    assert "'format': 'example/format'" in message  # the tag it should carry
    assert message.endswith(KIND.make)


def test_read_header_refuses_a_newer_format_version(tmp_path: Path) -> None:
    path = _write(tmp_path / "new.safetensors", format="example/format", format_version="3")
    with pytest.raises(ValueError) as caught:
        read_header(path, KIND)
    message = str(caught.value)
    assert f"'{path}'" in message and "example file format version 3" in message
    assert "(2)" in message  # the newest version this release reads
    assert "Upgrade lightning-score" in message
    assert read_header(_write(tmp_path / "same.safetensors", format="example/format", format_version="2"), KIND)


# --- LazySafetensors -----------------------------------------------------------------------------------

TENSORS = {
    "visual.proj": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "half": torch.full((4,), 0.5, dtype=torch.float16),
    "brain": torch.full((1, 2), 1.5, dtype=torch.bfloat16),
    "position_ids": torch.arange(5, dtype=torch.int64),
    "mask": torch.tensor([True, False]),
    "logit_scale": torch.tensor(4.5, dtype=torch.float64),
}


class _Recorded:
    """A real safe_open handle that records the tensors read through it."""

    def __init__(self, handle: Any, reads: list[str]) -> None:
        self._handle, self._reads = handle, reads

    def __enter__(self) -> _Recorded:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def get_tensor(self, key: str) -> torch.Tensor:
        self._reads.append(key)
        return self._handle.get_tensor(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Every ``safe_open`` of the module, and every tensor read through the handles it opened."""
    log: dict[str, list] = {"opens": [], "reads": []}
    real = tensor_files.safe_open

    def opening(path: str, framework: str, **kwargs: Any) -> _Recorded:
        log["opens"].append(path)
        return _Recorded(real(path, framework=framework, **kwargs), log["reads"])

    monkeypatch.setattr(tensor_files, "safe_open", opening)
    return log


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    return _write(tmp_path / "tv.safetensors", dict(TENSORS))


def test_lazy_reads_a_tensor_only_when_indexed_through_one_kept_handle(stored: Path, recorded: dict) -> None:
    lazy = LazySafetensors(stored)
    assert sorted(lazy) == sorted(TENSORS) and len(lazy) == len(TENSORS)
    assert recorded["reads"] == []  # listing the keys reads no tensor
    assert torch.equal(lazy["visual.proj"], TENSORS["visual.proj"])
    assert recorded["reads"] == ["visual.proj"]
    assert torch.equal(lazy["mask"], TENSORS["mask"]) and lazy["logit_scale"].dtype == torch.float64
    assert recorded["reads"] == ["visual.proj", "mask", "logit_scale"]
    assert len(recorded["opens"]) == 2  # the key listing, then one handle kept for every read


def test_tensor_spec_comes_from_the_header_without_reading_the_tensor(stored: Path, recorded: dict) -> None:
    lazy = LazySafetensors(stored)
    for key, tensor in TENSORS.items():
        assert lazy.tensor_spec(key) == (tuple(tensor.shape), tensor.dtype)
    assert recorded["reads"] == []


def test_an_unknown_key_is_a_key_error(stored: Path, recorded: dict) -> None:
    lazy = LazySafetensors(stored)
    with pytest.raises(KeyError, match="text.proj"):
        lazy["text.proj"]
    assert lazy.get("text.proj") is None and recorded["reads"] == []


def test_lazy_pickles_and_reads_after_unpickling(stored: Path) -> None:
    lazy = LazySafetensors(stored)
    fresh = pickle.loads(pickle.dumps(lazy))  # before any handle is open
    _ = lazy["half"]  # now one is
    opened = pickle.loads(pickle.dumps(lazy))
    for copy in (fresh, opened):
        assert list(copy) == list(lazy)
        assert all(torch.equal(copy[key], TENSORS[key]) for key in TENSORS)
        assert copy.tensor_spec("brain") == ((1, 2), torch.bfloat16)


# --- state_dict_fingerprint ----------------------------------------------------------------------------


def _fp(state: dict[str, torch.Tensor], **kwargs: Any) -> str:
    return state_dict_fingerprint(state, **kwargs)


def test_fingerprint_format_and_value_are_stable() -> None:
    state = {
        "visual.proj": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "logit_scale": torch.tensor(4.5).double(),
    }
    digest = hashlib.blake2b(digest_size=16)  # the recipe, written out: sorted keys, name|dtype|shape|, then bytes
    for key in sorted(state):
        digest.update(f"{key}|{state[key].dtype}|{tuple(state[key].shape)}|".encode())
        digest.update(state[key].numpy().tobytes())
    assert _fp(state) == "blake2b:" + digest.hexdigest()
    assert _fp(state) == "blake2b:6d9e92e91cd43779555bf99640c05848"  # files written earlier store this value
    assert re.fullmatch(r"blake2b:[0-9a-f]{32}", _fp({}))


def test_fingerprint_sees_names_dtypes_and_shapes() -> None:
    base = _fp({"w": torch.ones(2, 3)})
    assert _fp({"v": torch.ones(2, 3)}) != base
    assert _fp({"w": torch.ones(2, 3, dtype=torch.float64)}) != base
    assert _fp({"w": torch.ones(3, 2)}) != base  # the same bytes in another shape
    assert _fp({"w": torch.ones(6)}) != base
    assert _fp({"w": torch.ones(2, 3), "b": torch.zeros(0)}) != base  # an empty entry is still an entry
    half_bits = torch.ones(2, 3, dtype=torch.float16)
    assert _fp({"w": half_bits}) != _fp({"w": half_bits.view(torch.bfloat16)})  # same bits, another dtype


def test_fingerprint_sees_every_byte() -> None:
    tensor = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float32)
    base = _fp({"w": tensor})
    seen = {base}
    for position in range(tensor.numel() * tensor.element_size()):
        changed = tensor.clone()
        changed.view(torch.uint8)[position] ^= 1
        seen.add(_fp({"w": changed}))
    assert len(seen) == 1 + 12  # each flipped bit gives its own fingerprint


def test_fingerprint_ignores_non_float_entries_unless_named() -> None:
    floats = {"w": torch.ones(2), "b": torch.zeros(1, dtype=torch.bfloat16)}
    with_ints = {**floats, "position_ids": torch.arange(3), "mask": torch.tensor([True])}
    other_ints = {**floats, "position_ids": torch.arange(4), "mask": torch.tensor([False])}
    assert _fp(with_ints) == _fp(other_ints) == _fp(floats)
    named = ["w", "position_ids"]
    assert _fp(with_ints, keys=named) != _fp(other_ints, keys=named)
    assert _fp(with_ints, keys=["w"]) == _fp({"w": torch.ones(2)})  # only the named keys count


def test_fingerprint_is_order_and_layout_independent() -> None:
    state = {"a": torch.randn(3, 4), "b": torch.randn(2), "c": torch.tensor(1.0)}
    reordered = {key: state[key] for key in reversed(state)}
    assert _fp(state) == _fp(reordered)
    assert _fp(state, keys=["c", "a"]) == _fp(state, keys=("a", "c"))
    transposed = state["a"].T  # not contiguous: hashed as its values, not its storage
    assert _fp({"a": transposed}) == _fp({"a": transposed.contiguous()})
    assert _fp({"a": state["a"].requires_grad_()}) == _fp({"a": state["a"].detach().clone()})


@pytest.mark.parametrize("lost", ["the last tensor's end", "most of the header"])
def test_a_truncated_file_is_said_to_be_cut_off_not_a_pickle(tmp_path: Path, lost: str) -> None:
    path = _write(tmp_path / "rot30.safetensors", format="example/format")
    whole = path.read_bytes()
    path.write_bytes(whole[:-7] if lost == "the last tensor's end" else whole[:20])  # an interrupted copy
    with pytest.raises(ValueError) as caught:
        read_header(path, KIND)
    message = str(caught.value)
    assert message.startswith(f"The example file '{path}' is cut off: it holds ")
    if lost == "the last tensor's end":
        assert f"it holds {len(whole) - 7} of the {len(whole)} bytes its header describes" in message
    assert "interrupted copy" in message and message.endswith("Copy it again whole, or re-create it.")
    assert "pickle" not in message
