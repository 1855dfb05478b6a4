"""How a task vector is laid out in its safetensors file: dense entries by key, low-rank entries as factors.

A dense entry is stored under its own key. A low-rank entry Δ = s·B·A (:class:`LowRankUpdate`, a LoRA expert's
key) is stored as two tensors, ``<key>::B`` and ``<key>::A`` (no state-dict key contains ``::``), and the
header's ``low_rank`` record holds, per key, its scale, the weight's dtype, its shape and rank, and its
provenance. A file with no low-rank entry is written exactly as before (format version 1); one with any is
version 2, which earlier releases refuse with a message rather than misread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_score.utilities.low_rank import LowRankUpdate
from lightning_score.utilities.tensor_files import (
    FORMAT_KEY,
    VERSION_KEY,
    FileKind,
    LazySafetensors,
    read_header,
    state_dict_fingerprint,
)

__all__ = [
    "FACTOR_SUFFIXES",
    "FILE_FINGERPRINTS",
    "FORMAT",
    "FORMAT_VERSION",
    "KIND",
    "LOW_RANK_KEY",
    "EntryState",
    "LazyLowRank",
    "content_hash",
    "entry_state",
    "file_contents",
    "file_identity",
    "read_contents",
    "unchanged",
]

FORMAT = "lightning-score/task-vector"
FORMAT_VERSION = 2  # 2: low-rank entries as factors; a file without any is written as version 1

KIND = FileKind(
    format=FORMAT,
    version=FORMAT_VERSION,
    what="task vector",
    when_missing="Write one with ScoreMergeCallback during fit, or "
    "TaskVector.from_state_dicts(pretrained, finetuned).save(path).",
    when_unreadable="re-create it with TaskVector.save().",
    make="Build one with TaskVector.from_state_dicts(pretrained, finetuned) and save it with TaskVector.save().",
)
"""What a task-vector file is, for :func:`~lightning_score.utilities.tensor_files.read_header`."""

_METADATA_KEY = "metadata"

#: The names of a low-rank entry's two factors in the file, after its key.
FACTOR_SUFFIXES = ("::B", "::A")

#: The header field that lists the low-rank entries.
LOW_RANK_KEY = "low_rank"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _stored_tensors(dense: Mapping[str, Tensor], low_rank: Mapping[str, LowRankUpdate]) -> dict[str, Tensor]:
    """What the file holds: every dense entry by its key, every low-rank entry's factors under ``<key>::B|A``."""
    tensors = {key: tensor for key, tensor in dense.items()}
    for key, update in low_rank.items():
        tensors[key + FACTOR_SUFFIXES[0]] = update.B
        tensors[key + FACTOR_SUFFIXES[1]] = update.A
    return tensors


def _low_rank_record(low_rank: Mapping[str, LowRankUpdate]) -> dict[str, dict[str, Any]]:
    """The header's ``low_rank`` record: per key its scale, weight dtype, shape and rank (JSON)."""
    return {
        key: {
            "scale": update.scale,
            "dtype": str(update.dtype).removeprefix("torch."),
            "shape": list(update.shape),
            "rank": update.rank,
        }
        for key, update in low_rank.items()
    }


def _dense_keys(path: Path, header: Mapping[str, str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The dense keys of a task-vector file and its ``low_rank`` record, checked against each other.

    Raises:
        ValueError: A low-rank entry lacks one of its factors, or the record is not valid JSON.
    """
    try:
        record = json.loads(header.get(LOW_RANK_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' has a damaged '{LOW_RANK_KEY}' header record ({error}); re-create it.") from None
    names = LazySafetensors(path).keys()
    factor_names = {key + suffix for key in record for suffix in FACTOR_SUFFIXES}
    missing = sorted(factor_names - set(names))
    if missing or any(entry.get("dtype") not in _DTYPES for entry in record.values()):
        raise ValueError(
            f"'{path}' records low-rank entries whose factors or dtypes are missing (e.g. {missing[:2]}); "
            "the file is damaged: re-create it with TaskVector.save()."
        )
    return [name for name in names if name not in factor_names], record


class LazyLowRank(Mapping[str, LowRankUpdate]):
    """The low-rank entries of a task-vector file, each read (memory-mapped) only when it is indexed.

    Args:
        tensors: The file's tensors.
        record: Its header's ``low_rank`` record.
    """

    def __init__(self, tensors: LazySafetensors, record: Mapping[str, Mapping[str, Any]]) -> None:
        self._tensors = tensors
        self._record = dict(record)

    def __getitem__(self, key: str) -> LowRankUpdate:
        entry = self._record[key]
        B, A = (self._tensors[key + suffix] for suffix in FACTOR_SUFFIXES)
        return LowRankUpdate(B, A, float(entry["scale"]), _DTYPES[entry["dtype"]])

    def __iter__(self) -> Iterator[str]:
        return iter(self._record)

    def __len__(self) -> int:
        return len(self._record)

    def __contains__(self, key: object) -> bool:
        return key in self._record

    def tensor_spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """The dense update's shape and dtype, from the header."""
        entry = self._record[key]
        return tuple(entry["shape"]), _DTYPES[entry["dtype"]]


#: Content fingerprints of task-vector files already hashed in this process, keyed by the file's identity.
FILE_FINGERPRINTS: dict[tuple[str, int, int, int, int], str] = {}


def file_identity(path: Path) -> tuple[str, int, int, int, int]:
    """A file's identity: its resolved path, device, inode, size and modification time."""
    stat = path.stat()
    return str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


# The entries at one moment: (key, tensor, its version counter, which in-place changes increment) per key of a dict;
# "lazy" for any other mapping, e.g. a file read key by key (every read a new tensor); None: not recorded.
EntryState = tuple[tuple[str, Tensor, int], ...] | str | None


def unchanged(now: EntryState, then: EntryState) -> bool:
    """Whether the entries are the very tensors they were, none changed in place since."""
    if not isinstance(now, tuple) or not isinstance(then, tuple) or len(now) != len(then):
        return now is not None and not isinstance(now, tuple) and now == then
    return all(a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(now, then, strict=True))


def file_contents(
    dense: Mapping[str, Tensor], low_rank: Mapping[str, LowRankUpdate], metadata: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (on CPU, contiguous) and the header a task vector's file holds."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _stored_tensors(dense, low_rank).items()}
    header = {
        FORMAT_KEY: FORMAT,
        VERSION_KEY: str(FORMAT_VERSION if low_rank else 1),  # readable by earlier releases when dense
        _METADATA_KEY: json.dumps(dict(metadata), sort_keys=True),
    }
    if low_rank:
        header[LOW_RANK_KEY] = json.dumps(_low_rank_record(low_rank))
    return tensors, header


def read_contents(
    path: Path, kind: FileKind, lazy: bool
) -> tuple[Mapping[str, Tensor], dict[str, Any], Mapping[str, LowRankUpdate]]:
    """A task-vector file's dense entries, metadata and low-rank entries (memory-mapped when ``lazy``).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: It is not a task-vector file this release reads, or its low-rank record is damaged.
    """
    header = read_header(path, kind)
    metadata = json.loads(header.get(_METADATA_KEY, "{}"))
    keys, record = _dense_keys(path, header)
    lazy_tensors = LazySafetensors(path, keys if record else None)
    tensors: Mapping[str, Tensor] = lazy_tensors if lazy else {k: lazy_tensors[k] for k in lazy_tensors}
    factors: Mapping[str, LowRankUpdate] = LazyLowRank(LazySafetensors(path), record) if record else {}
    return tensors, metadata, factors if lazy else dict(factors.items())


def content_hash(dense: Mapping[str, Tensor], low_rank: Mapping[str, LowRankUpdate]) -> str:
    """The fingerprint of a task vector's entries as stored: dense tensors, and factors with scale and dtype.

    A dense task vector's is :func:`state_dict_fingerprint` of its tensors, as it always was.
    """
    if not low_rank:
        return state_dict_fingerprint(dense, list(dense))
    scales = {
        f"{key}::scale|{update.dtype}": torch.tensor([update.scale], dtype=torch.float64)
        for key, update in low_rank.items()
    }
    stored = {**_stored_tensors(dense, low_rank), **scales}
    return state_dict_fingerprint(stored, list(stored))


def entry_state(dense: Mapping[str, Tensor], low_rank: Mapping[str, LowRankUpdate]) -> EntryState:
    """The entries as they are now (see ``EntryState``); ``"lazy"`` for mappings that are not dicts.

    A low-rank entry counts as its two factors (their version counters) and its scale and dtype.
    """
    if not isinstance(dense, dict) or not isinstance(low_rank, dict):  # reading them all on every call could
        return "lazy"  # cost as much as hashing
    factors = [(f"{key}::{i}", t) for key, u in low_rank.items() for i, t in enumerate((u.B, u.A))]
    versions = tuple((key, tensor, tensor._version) for key, tensor in [*dense.items(), *factors])
    return versions + tuple((f"{key}::scale", u.B, hash((u.scale, u.dtype))) for key, u in low_rank.items())
