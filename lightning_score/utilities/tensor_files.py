"""safetensors files of lightning-score: their header checked once, their tensors read lazily, their content hashed.

Every tensor file lightning-score writes for itself (task vectors, the pre-trained snapshot θ₀) is a safetensors
file whose header metadata names its format (``{"format": ..., "format_version": ...}``). :func:`read_header`
opens one and checks that it is what the caller expects, with one clear message per way it can be wrong;
:class:`LazySafetensors` is the file as a read-only mapping that reads a tensor only when it is indexed;
:func:`state_dict_fingerprint` hashes tensors' names, dtypes, shapes and bytes. Nothing but safetensors is ever
read, so loading can never execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

__all__ = [
    "FileKind",
    "LazySafetensors",
    "NewerFormatError",
    "cut_off",
    "format_version",
    "read_header",
    "state_dict_fingerprint",
]

FORMAT_KEY = "format"
VERSION_KEY = "format_version"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class FileKind:
    """A kind of lightning-score safetensors file: its format tag and version, and how messages name it.

    Attributes:
        format: The header's ``format`` value, e.g. ``"lightning-score/task-vector"``.
        version: The newest ``format_version`` this release reads (a file without one is version 0).
        what: What one is called in messages, e.g. ``"task vector"``.
        when_missing: What to do when the file does not exist (a sentence).
        when_unreadable: What to do when it is not a safetensors file (the end of a sentence).
        make: How to make a file of this kind (a sentence).
    """

    format: str
    version: int
    what: str
    when_missing: str
    when_unreadable: str
    make: str


class NewerFormatError(ValueError):
    """A lightning-score file written in a newer format version than this release reads (see :func:`read_header`)."""


def cut_off(path: str | os.PathLike[str]) -> str | None:
    """Why a safetensors file is cut off (shorter than its own header says), or None when it is not.

    A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes at the offsets the header
    gives; a file that starts like one but ends before the header or the last tensor does was cut short, e.g. by
    an interrupted copy or download, or a full disk.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "a.safetensors"
        >>> save_file({"w": torch.zeros(256)}, str(path))
        >>> cut_off(path) is None
        True
        >>> size = path.write_bytes(path.read_bytes()[:-100])  # the last 100 bytes lost
        >>> cut_off(path) == f"it holds {size} of the {size + 100} bytes its header describes"
        True
    """
    with open(path, "rb") as handle:
        start = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
        if len(start) < 9 or start[8:9] != b"{":
            return None  # not even the start of a safetensors header
        length = int.from_bytes(start[:8], "little")
        if length > _MAX_HEADER_BYTES:
            return None
        if size < 8 + length:
            return f"it holds {size} bytes, and its header alone takes {8 + length}"
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return None  # a damaged header, not a short file
    expected = 8 + length + int(end)
    return f"it holds {size} of the {expected} bytes its header describes" if size < expected else None


def read_header(path: str | os.PathLike[str], kind: FileKind) -> dict[str, str]:
    """Open ``path`` as a safetensors file of ``kind`` and return its header metadata, or raise a clear error.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A folder, not a safetensors file (or one cut off: :func:`cut_off`), or a safetensors file of
            another kind.
        NewerFormatError: A file written in a newer format version than this release reads (a ValueError).

    Example:
        >>> kind = FileKind("example/format", 1, "example file", "Make one first.", "re-create it.", "Use save().")
        >>> read_header("no-such-file.safetensors", kind)
        Traceback (most recent call last):
        ...
        FileNotFoundError: The example file 'no-such-file.safetensors' does not exist. Make one first.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"The {kind.what} '{path}' does not exist. {kind.when_missing}")
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder, not a {kind.what}: pass the path of a .safetensors file.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        short = cut_off(path)
        if short is not None:
            raise ValueError(
                f"The {kind.what} '{path}' is cut off: {short} (an interrupted copy, download or write, or a full "
                f"disk). Copy it again whole, or {kind.when_unreadable}"
            ) from error
        raise ValueError(
            f"'{path}' is not a safetensors file ({error}). lightning-score reads a {kind.what} only from "
            f"safetensors (never pickles); {kind.when_unreadable}"
        ) from error
    if header.get(FORMAT_KEY) != kind.format:
        raise ValueError(
            f"'{path}' is a safetensors file but not a lightning-score {kind.what} (its metadata has no "
            f"'{FORMAT_KEY}': '{kind.format}'). {kind.make}"
        )
    format_version(path, header, kind)
    return header


def format_version(path: str | os.PathLike[str], header: Mapping[str, str], kind: FileKind) -> int:
    """The ``format_version`` of a file of ``kind`` (0 when it records none), checked readable by this release.

    Raises:
        ValueError: The version is not a number.
        NewerFormatError: It is newer than ``kind.version``.
    """
    try:
        version = int(header.get(VERSION_KEY, "0"))
    except ValueError:
        raise ValueError(
            f"'{path}' records format version {header[VERSION_KEY]!r}, which is not a number: the file is damaged or "
            f"not written by lightning-score. {kind.make}"
        ) from None
    if version > kind.version:
        raise NewerFormatError(
            f"'{path}' was written in {kind.what} format version {version}, newer than this lightning-score reads "
            f"({kind.version}). Upgrade lightning-score to read it."
        )
    return version


class LazySafetensors(Mapping[str, Tensor]):
    """A safetensors file as a read-only mapping that reads (memory-maps) a tensor only when it is indexed.

    One handle is kept open for the object's life; a pickled copy (e.g. sent to a spawned worker) reopens the file.

    Args:
        path: The file.
        keys: Only these of its tensors (default: all of them).
    """

    def __init__(self, path: str | os.PathLike[str], keys: Iterable[str] | None = None) -> None:
        self._path = Path(path)
        self._handle: Any = None
        with safe_open(str(self._path), framework="pt") as handle:
            self._keys = list(handle.keys())
        if keys is not None:
            wanted = set(keys)
            self._keys = [key for key in self._keys if key in wanted]

    def _open(self) -> Any:
        if self._handle is None:
            self._handle = safe_open(str(self._path), framework="pt")
        return self._handle

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._open().get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:  # from the key list: Mapping's default would read the tensor
        return key in self._keys

    def tensor_spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one entry, read from the file header without loading the tensor."""
        if key not in self._keys:
            raise KeyError(key)
        view = self._open().get_slice(key)
        return tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()]

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle; reopen on the other side
        return {"_path": self._path, "_keys": self._keys, "_handle": None}


def state_dict_fingerprint(state_dict: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> str:
    """A content hash of (some of) a state dict's tensors: names, dtypes, shapes and every byte.

    Two task vectors can only be merged or applied when they were made from the same pre-trained
    weights; comparing fingerprints checks that without keeping the weights around.

    Args:
        state_dict: The tensors to hash.
        keys: The keys to include; defaults to every floating-point entry.

    Returns:
        ``"blake2b:"`` followed by 32 hexadecimal digits.

    Example:
        >>> import torch
        >>> a = {"w": torch.ones(2, 2)}
        >>> state_dict_fingerprint(a) == state_dict_fingerprint({"w": torch.ones(2, 2)})
        True
        >>> state_dict_fingerprint(a) == state_dict_fingerprint({"w": torch.zeros(2, 2)})
        False
        >>> state_dict_fingerprint({"logit_scale": torch.tensor(4.6)})[:8]  # 0-d entries too
        'blake2b:'
    """
    if keys is None:
        keys = [k for k, v in state_dict.items() if torch.is_floating_point(v)]
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(keys):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # the bytes, without a copy
    return "blake2b:" + digest.hexdigest()
