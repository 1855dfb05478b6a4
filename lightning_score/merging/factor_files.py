"""Factor files: one expert's per-key thin SVDs as a safetensors file, shared by processes and cluster jobs.

A file holds, for some matrix keys of one task vector, the leading singular triplets of its thin SVD
Δ = U S Vᵀ as computed on one kind of device in one dtype (tensors ``<key>::U [m, q]``, ``<key>::S [q]``,
``<key>::Vh [q, n]``, q ≤ min(m, n)), and a header naming the format and its version, the task vector's content
fingerprint, the device, the dtype, the torch version, and a digest of each key's tensors. Its name hashes the
fingerprint, device and dtype, so a file is only ever read back by a process that would compute the same bits, and
a re-trained expert (new content) gets a new file.

Every key's tensors are checked against their digest when the file is opened: a key that fails (a flipped bit, a
cut or edited tensor) counts as not held, so it is computed again, and a rewrite never copies it; a file that
cannot be read, or one of format version 1 (which had no digests), counts as none and is replaced. A file of a newer
format version is neither read nor replaced (the release that wrote it still reads it).

Files are written atomically (a temporary file, then a rename), so a reader sees a complete file or none;
:func:`factor_lock` (a :mod:`filelock` lock beside the file) lets a second process wait for the first instead
of computing the same factors again. :class:`FactorStore` is what a :class:`FactorCache` works with: one
expert's file for one device and dtype, read, locked and rewritten through one object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import filelock
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_score.utilities.files import atomic_write, lock_holder
from lightning_score.utilities.tensor_files import (
    FileKind,
    NewerFormatError,
    cut_off,
    format_version,
    state_dict_fingerprint,
)

__all__ = ["FORMAT", "FactorFile", "FactorStore", "device_tag", "factor_lock", "factor_path", "write_factor_file"]

log = logging.getLogger(__name__)

FORMAT = "lightning-score/factors"
FORMAT_VERSION = 2  # 2: a digest of each key's tensors in the header
Triplet = tuple[Tensor, Tensor, Tensor]
_NAMES = ("U", "S", "Vh")

KIND = FileKind(
    format=FORMAT,
    version=FORMAT_VERSION,
    what="factor file",
    when_missing="FactorCache(save=True) writes one.",
    when_unreadable="it is computed again and replaced.",
    make="FactorCache(save=True) writes one.",
)
"""What a factor file is, for :func:`~lightning_score.utilities.tensor_files.format_version`."""


def triplet_digest(triplet: Triplet) -> str:
    """The digest a factor file stores of one key's ``(U, S, Vh)``: their dtypes, shapes and every byte."""
    return state_dict_fingerprint(dict(zip(_NAMES, triplet, strict=True)), _NAMES)


def device_tag(device: torch.device) -> str:
    """What decides the bits of an SVD besides its input: the device kind (and GPU model), and torch's version."""
    tag = f"{device.type}|torch {torch.__version__}"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        tag += f"|{torch.cuda.get_device_name(index)}|cuda {torch.version.cuda}"
    return tag


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=6).hexdigest()


def factor_path(
    fingerprint: str, device: torch.device, dtype: torch.dtype, *, beside: Path | None, directory: Path | None
) -> Path | None:
    """Where the factors of a task vector live: in ``directory``, else beside its file ``beside``, else nowhere.

    The name is ``<task-vector stem>.factors-<hash>.safetensors`` (``factors-<hash>.safetensors`` in a directory),
    the hash covering the content fingerprint, :func:`device_tag` and the dtype.
    """
    tag = _digest(fingerprint, device_tag(device), str(dtype))
    if directory is not None:
        return Path(directory) / f"factors-{fingerprint.split(':')[-1][:16]}-{tag}.safetensors"
    if beside is not None:
        return beside.with_name(f"{beside.stem}.factors-{tag}.safetensors")
    return None


class FactorFile:
    """A factor file opened for reading, every key's tensors checked against their digest.

    Args:
        path: The file.
        fingerprint: The content fingerprint the file must have been written for.
        device: The device the factors must have been computed on.
        dtype: The dtype they must be in.

    Attributes:
        ranks: How many leading triplets the file holds per key, of the keys that passed the check.
        damaged: The keys whose tensors failed it (not held, never read).

    Raises:
        ValueError: The file is not a readable factor file of this task vector, device and dtype, or was written
            without digests (format version 1); the message names it.
        NewerFormatError: It was written in a newer format version (a ValueError).
    """

    def __init__(self, path: Path, fingerprint: str, device: torch.device, dtype: torch.dtype) -> None:
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt")
            header = self._handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            short = cut_off(path) if path.is_file() else None
            raise ValueError(
                f"'{path}' is not a readable factor file ({f'cut off: {short}' if short else error})."
            ) from error
        wanted = {"format": FORMAT, "fingerprint": fingerprint, "device": device_tag(device), "dtype": str(dtype)}
        found = {name: header.get(name) for name in wanted}
        if found != wanted:
            raise ValueError(f"'{path}' holds factors of {found}, not of {wanted}.")
        if format_version(path, header, KIND) < 2:
            raise ValueError(f"'{path}' was written without a digest of its tensors (factor file format version 1).")
        try:
            ranks = {str(key): int(rank) for key, rank in json.loads(header.get("ranks", "{}")).items()}
            digests = dict(json.loads(header["digests"]))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"'{path}' has a damaged header (its ranks or digests: {error}).") from None
        self.damaged = [key for key, rank in ranks.items() if not self._intact(key, rank, digests.get(key))]
        self.ranks: dict[str, int] = {key: rank for key, rank in ranks.items() if key not in self.damaged}

    def _intact(self, key: str, rank: int, digest: str | None) -> bool:
        """Whether the key's tensors are ``U [m, rank]``, ``S [rank]``, ``Vh [rank, n]`` and match ``digest``."""
        try:
            U, S, Vh = self.read(key)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return False  # a tensor missing or unreadable
        shapes_agree = U.ndim == 2 and S.ndim == 1 and Vh.ndim == 2 and U.shape[1] == len(S) == Vh.shape[0] == rank
        return shapes_agree and digest == triplet_digest((U, S, Vh))

    def rank(self, key: str) -> int:
        """How many leading triplets the file holds for ``key`` (0: none, or its tensors failed their digest)."""
        return self.ranks.get(key, 0)

    def read(self, key: str) -> Triplet:
        """The stored ``(U [m, q], S [q], Vh [q, n])`` of ``key``, on CPU."""
        return tuple(self._handle.get_tensor(f"{key}::{name}") for name in _NAMES)  # type: ignore[return-value]


def open_factor_file(path: Path, fingerprint: str, device: torch.device, dtype: torch.dtype) -> FactorFile | None:
    """The file at ``path`` if it exists and matches; a mismatching or damaged file is logged and ignored.

    Keys whose tensors fail their digest are logged, naming the file, and count as not held.

    Raises:
        NewerFormatError: The file was written in a newer format version (the caller neither reads nor replaces it).
    """
    if not path.is_file():
        return None
    try:
        file = FactorFile(path, fingerprint, device, dtype)
    except NewerFormatError:
        raise
    except ValueError as error:
        log.warning("Ignoring factor file: %s It will be computed again and replaced.", error)
        return None
    if file.damaged:
        log.warning(
            "Ignoring the factors of %d key(s) in '%s' (e.g. %s): their tensors do not match the digest stored "
            "with them (the file is damaged). They are computed again, and the file is rewritten without them.",
            len(file.damaged), path, file.damaged[:3],
        )  # fmt: skip
    return file


def write_factor_file(
    path: Path, fingerprint: str, device: torch.device, dtype: torch.dtype, factors: Mapping[str, Triplet]
) -> Path:
    """Write ``{key: (U, S, Vh)}`` atomically as the factor file of a task vector.

    Args:
        path: The destination (see :func:`factor_path`).
        fingerprint: The task vector's content fingerprint.
        device: The device the factors were computed on.
        dtype: Their dtype.
        factors: The leading triplets per key.

    Returns:
        ``path``.
    """
    tensors: dict[str, Tensor] = {}
    digests: dict[str, str] = {}
    for key, triplet in factors.items():
        stored = tuple(tensor.detach().to("cpu").contiguous() for tensor in triplet)
        tensors.update({f"{key}::{name}": tensor for name, tensor in zip(_NAMES, stored, strict=True)})
        digests[key] = triplet_digest(stored)  # type: ignore[arg-type]
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "fingerprint": fingerprint,
        "device": device_tag(device),
        "dtype": str(dtype),
        "ranks": json.dumps({key: int(triplet[1].shape[-1]) for key, triplet in factors.items()}, sort_keys=True),
        "digests": json.dumps(digests, sort_keys=True),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


@contextlib.contextmanager
def factor_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the inter-process lock of a factor file (``<file>.lock`` beside it) while computing and writing it.

    Raises:
        TimeoutError: Another process held the lock longer than ``timeout`` seconds; the message names the lock
            and its holder (:func:`~lightning_score.utilities.files.lock_holder`).
    """
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise TimeoutError(
            f"Waited {timeout:g} s for the factor lock '{lock_path}': it is held by {lock_holder(lock_path)}, "
            "computing the same factors. The lock is released the moment its holder exits, even if it is killed, "
            "so do not delete the lock file (that would not stop the holder); wait for that process to finish, stop "
            "it, or raise FactorCache(lock_timeout=...)."
        ) from None
    try:
        yield
    finally:
        lock.release()


class FactorStore:
    """One expert's factor file for one device and dtype, as a merge uses it: what it holds, read, rewritten.

    It opens the file itself (:func:`open_factor_file`: a foreign or damaged file counts as none, a key whose
    tensors fail their digest as not held) and opens it again after :meth:`write` and inside :meth:`locked`, where
    another process may have just written it. A file of a newer format version is neither read nor replaced
    (:attr:`writable` is False).

    Args:
        path: The file (see :func:`factor_path`); None: the expert has no file (nothing held, nothing written).
        fingerprint: The task vector's content fingerprint.
        device: The device the factors are computed on.
        dtype: Their dtype.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> U, S, Vh = torch.linalg.svd(torch.randn(4, 3), full_matrices=False)
        >>> folder = Path(tempfile.mkdtemp())
        >>> store = FactorStore(folder / "e.factors.safetensors", "blake2b:e", torch.device("cpu"), torch.float32)
        >>> store.rank("w"), store.write({"w": (U[:, :2], S[:2], Vh[:2])}), store.rank("w")
        (0, 1, 2)
        >>> torch.equal(store.read("w")[1], S[:2])
        True
    """

    def __init__(self, path: Path | None, fingerprint: str, device: torch.device, dtype: torch.dtype) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.device = device
        self.dtype = dtype
        self._file: FactorFile | None = None
        self._newer = False
        self.reload()

    def reload(self) -> None:
        """Open the file again (another process may have written it since)."""
        self._file, self._newer = None, False
        if self.path is None:
            return
        try:
            self._file = open_factor_file(self.path, self.fingerprint, self.device, self.dtype)
        except NewerFormatError as error:
            self._newer = True
            log.warning("Not using factor file: %s It is left in place; the factors are computed in memory.", error)

    @property
    def writable(self) -> bool:
        """Whether there is a file to write: a path, and no file of a newer format version there."""
        return self.path is not None and not self._newer

    @property
    def ranks(self) -> dict[str, int]:
        """How many leading triplets the file holds per key, in the file's order (empty without a file)."""
        return dict(self._file.ranks) if self._file is not None else {}

    def rank(self, key: str) -> int:
        """How many leading triplets the file holds for ``key`` (0: none, or no file)."""
        return self._file.rank(key) if self._file is not None else 0

    def read(self, key: str) -> Triplet:
        """The stored ``(U [m, q], S [q], Vh [q, n])`` of ``key``, on CPU.

        Raises:
            KeyError: The file holds nothing for ``key`` (check :meth:`rank` first).
        """
        if self._file is None or not self._file.rank(key):
            raise KeyError(f"The factor file {self.path} holds no factors of key '{key}'.")
        return self._file.read(key)

    def write(self, entries: Mapping[str, Triplet]) -> int:
        """Rewrite the file with ``entries`` and what it already holds, then open it again.

        For each key the file holds or ``entries`` has, the file keeps the entry unless the file already holds
        more triplets of that key (those it keeps). Write under :meth:`locked`.

        Returns:
            How many keys the file holds now.

        Raises:
            ValueError: The store has no path, or its file is of a newer format version.
        """
        if self.path is None:
            raise ValueError(f"The factors of {self.fingerprint} have no file to write (FactorStore(path=None)).")
        if self._newer:
            raise ValueError(f"'{self.path}' is of a newer factor file format; this release does not replace it.")
        merged: dict[str, Triplet] = {}
        for key in dict.fromkeys([*self.ranks, *entries]):
            held, on_file = entries.get(key), self.rank(key)
            if held is not None and held[1].shape[-1] >= on_file:
                merged[key] = held
            elif on_file:
                merged[key] = self.read(key)
        write_factor_file(self.path, self.fingerprint, self.device, self.dtype, merged)
        self.reload()
        return len(merged)

    @contextlib.contextmanager
    def locked(self, timeout: float) -> Iterator[None]:
        """Hold the file's inter-process lock (:func:`factor_lock`), the file opened again once it is held.

        Raises:
            ValueError: The store has no path.
            TimeoutError: See :func:`factor_lock`.
        """
        if self.path is None:
            raise ValueError(f"The factors of {self.fingerprint} have no file to lock (FactorStore(path=None)).")
        with factor_lock(self.path, timeout):
            self.reload()
            yield
