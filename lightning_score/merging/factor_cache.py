"""Each expert's thin SVDs computed once, and fed to every merge that starts from them.

SCORE (its four variants), TSV-M and ESM's TSV-merged layers all begin every matrix key with the thin SVD of
each task's update, Δ_t = U_t S_t V_tᵀ. That factorization belongs to the expert alone: a leave-one-domain-out
study that merges N experts N − 1 at a time, with several SVD-based rows per target, would otherwise repeat
every expert's SVDs (N − 1) × rows times. Rows of one target share more still: SCORE's variants and TSV-M
build the same shared orthogonal basis (polar factors of the concatenated leading vectors) from the same
experts, and SCORE's variants project every task into it identically.

A :class:`FactorCache` keeps, per (expert, key, device, dtype):

* the leading q singular triplets of the expert's thin SVD, q = max(⌊r/T⌋, ⌊r/``min_tasks``⌋) for r = min(m, n)
  (all r with ``min_tasks=1``): what every merge of at least ``min_tasks`` experts reads;
* optionally a safetensors file of them beside the task vector (``save=True``), keyed by the task vector's
  content fingerprint, written atomically under an inter-process lock, so that processes and cluster jobs share
  them; the sign convention is applied when they are read, so one file serves both;

and, for the set of experts merged most recently, what methods derive from those factors (the shared basis,
SCORE's projections), so that the rows of one target compute them once. Every reuse returns the very tensors a
fresh computation would produce (the same solver call on the same matrix, sliced), so merges are bit-identical
with and without the cache on one device.

Sizes, for a ViT-B/32 image tower (88 M parameters, 350 MB in float32): one expert's full factors are ~1.2× its
task vector (``min_tasks=1``); with ``min_tasks=5`` (merges of 5 or more experts) ~0.26×. The derived results of
one set of 5 experts take ~3× one task vector (basis ~1.3×, SCORE's projections ~1.7×); ``reuse_bases=False``
keeps none of them. ``max_bytes`` bounds the total, dropping the least recently used first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_score.merging.factor_files import (
    FactorFile,
    Triplet,
    factor_lock,
    factor_path,
    open_factor_file,
    write_factor_file,
)
from lightning_score.merging.keys import is_matrix_key, resolve_device
from lightning_score.merging.prefetch import prefetched
from lightning_score.merging.svd import canonicalize_signs, leading_triplets
from lightning_score.task_vector import TaskVector

__all__ = ["ExpertSet", "FactorCache", "KeyFactors"]

log = logging.getLogger(__name__)

Derived = TypeVar("Derived")
Loader = Callable[[int, str, torch.dtype], Tensor]
"""``load(task index, key, dtype)``: one task's slice of a key on the compute device."""


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(part) for part in value)
    return 0


def _device(device: torch.device) -> torch.device:
    """The device with its index (``cuda`` → ``cuda:0``), as the tensors on it name it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _truncate(triplet: Triplet, rank: int) -> Triplet:
    """The leading ``rank`` triplets as tensors of their own (a slice would keep the whole SVD alive)."""
    U, S, Vh = triplet
    return U[:, :rank].clone(), S[:rank].clone(), Vh[:rank].clone()


class FactorCache:
    """Per-expert thin SVDs (and results derived from them) shared by every merge of a process.

    Pass one cache to every :func:`~lightning_score.merging.merge_task_vectors` call (``factors=cache``) of a
    study or sweep; methods that do not start from per-task SVDs ignore it.

    Args:
        save: Also keep each expert's factors in a safetensors file (beside its task-vector file, or in
            ``directory``), read back by later processes and cluster jobs instead of computing them again.
        directory: Where to put the files (default: beside each task vector; in-memory task vectors then
            get none).
        min_tasks: The smallest number of experts the kept factors serve: each keeps max(⌊r/T⌋, ⌊r/min_tasks⌋)
            leading triplets of r. 1 (default) keeps them all; a leave-one-out study of N domains passes N − 1.
        max_bytes: Bound on the memory the cache holds (factors and derived results, on the compute device);
            the least recently used go first and are read from their file or computed again when needed.
            None (default): no bound.
        reuse_bases: Keep what methods derive from the factors for the set of experts merged last (SCORE's
            and TSV-M's shared basis, SCORE's projections), so the rows of one target compute it once.
        lock_timeout: Seconds to wait for another process computing the same expert's factors file.

    Example:
        >>> import torch
        >>> from lightning_score.merging import FactorCache, merge_task_vectors
        >>> tvs = [{"w": torch.randn(6, 4)} for _ in range(3)]
        >>> cache = FactorCache()
        >>> a = merge_task_vectors(tvs, "score", device="cpu", factors=cache)
        >>> b = merge_task_vectors(tvs, "tsv", device="cpu", factors=cache)   # reuses the SVDs and the basis
        >>> cache.stats["svd_computed"], cache.stats["derived_reused"]
        (3, 1)
    """

    def __init__(
        self,
        *,
        save: bool = False,
        directory: str | Path | None = None,
        min_tasks: int = 1,
        max_bytes: int | None = None,
        reuse_bases: bool = True,
        lock_timeout: float = 3600.0,
    ) -> None:
        if not isinstance(min_tasks, int) or min_tasks < 1:
            raise ValueError(f"FactorCache: min_tasks must be an integer ≥ 1, got {min_tasks!r}.")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"FactorCache: max_bytes must be ≥ 0 or None, got {max_bytes!r}.")
        self.save = save
        self.directory = Path(directory) if directory is not None else None
        self.min_tasks = min_tasks
        self.max_bytes = max_bytes
        self.reuse_bases = reuse_bases
        self.lock_timeout = lock_timeout
        self._store: OrderedDict[Hashable, Any] = OrderedDict()  # LRU: factors and derived results
        self._bytes = 0
        self._files: dict[tuple[str, str, str], FactorFile | None] = {}
        self._anonymous = False  # one merge's cache: experts are told apart by position, not fingerprint
        #: Counters: ``svd_computed``, ``svd_from_memory``, ``svd_from_file``, ``derived_computed``,
        #: ``derived_reused``, ``files_written``.
        self.stats: dict[str, int] = dict.fromkeys(
            ("svd_computed", "svd_from_memory", "svd_from_file", "derived_computed", "derived_reused", "files_written"),
            0,
        )

    @classmethod
    def for_one_merge(cls, num_tasks: int) -> FactorCache:
        """A cache for one merge of ``num_tasks`` experts (kept: the ⌊r/T⌋ triplets it reads; nothing hashed).

        It tells the experts apart by their position, so it must not be passed to another merge.
        """
        cache = cls(min_tasks=num_tasks, reuse_bases=False)
        cache._anonymous = True
        return cache

    # --- memory ---------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now (factors and derived results)."""
        return self._bytes

    def clear(self) -> None:
        """Drop everything held in memory (files stay)."""
        self._store.clear()
        self._bytes = 0

    def _get(self, name: Hashable) -> Any:
        value = self._store.get(name)
        if value is not None:
            self._store.move_to_end(name)
        return value

    def _put(self, name: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return
        old = self._store.pop(name, None)
        self._bytes -= _nbytes(old)
        self._store[name] = value
        self._bytes += size
        while self.max_bytes is not None and self._bytes > self.max_bytes:
            _, evicted = self._store.popitem(last=False)
            self._bytes -= _nbytes(evicted)

    def _drop_derived_except(self, keep: Hashable) -> None:
        for name in [n for n in self._store if n[0] == "derived" and n[1] != keep]:
            self._bytes -= _nbytes(self._store.pop(name))

    # --- factors of one expert --------------------------------------------------------------------

    def _rank_to_keep(self, shape: tuple[int, ...], num_tasks: int) -> int:
        r = min(shape[-2], shape[-1])
        return max(r // num_tasks, r // self.min_tasks)

    def _file(self, tv: TaskVector, fingerprint: str, device: torch.device, dtype: torch.dtype) -> FactorFile | None:
        name = (fingerprint, str(device), str(dtype))
        if name not in self._files:
            path = self._path(tv, fingerprint, device, dtype)
            self._files[name] = open_factor_file(path, fingerprint, device, dtype) if path is not None else None
        return self._files[name]

    def _path(self, tv: TaskVector, fingerprint: str, device: torch.device, dtype: torch.dtype) -> Path | None:
        if not self.save:
            return None
        return factor_path(fingerprint, device, dtype, beside=tv.path, directory=self.directory)

    def _available(self, fingerprint: str, key: str, device: torch.device, dtype: torch.dtype) -> int:
        """How many leading triplets of a key are held, in memory or in the expert's file (none read)."""
        held = self._store.get(("factors", fingerprint, key, str(device), str(dtype)))
        file = self._files.get((fingerprint, str(device), str(dtype)))
        return max(held[1].shape[-1] if held is not None else 0, file.rank(key) if file is not None else 0)

    def _lookup(
        self, fingerprint: str, key: str, device: torch.device, dtype: torch.dtype, rank: int
    ) -> Triplet | None:
        """Leading triplets of at least ``rank`` from memory, else from the expert's file, else None."""
        name = ("factors", fingerprint, key, str(device), str(dtype))
        triplet = self._get(name)
        if triplet is not None and triplet[1].shape[-1] >= rank:
            self.stats["svd_from_memory"] += 1
            return triplet
        file = self._files.get((fingerprint, str(device), str(dtype)))
        if file is not None and file.rank(key) >= rank:
            triplet = tuple(t.to(device) for t in file.read(key))  # type: ignore[assignment]
            self._put(name, triplet)
            self.stats["svd_from_file"] += 1
            return triplet
        return None

    def _keep(self, fingerprint: str, key: str, device: torch.device, dtype: torch.dtype, triplet: Triplet) -> None:
        self.stats["svd_computed"] += 1
        self._put(("factors", fingerprint, key, str(device), str(dtype)), triplet)

    def triplets(self, fingerprint: str, key: str, matrix: Callable[[], Tensor], rank: int, keep: int) -> Triplet:
        """One expert's leading triplets of a key (at least ``rank``), computed from ``matrix()`` if not held.

        Args:
            fingerprint: The expert's content fingerprint.
            key: The key.
            matrix: Returns the expert's ``[m, n]`` slice on the compute device in the compute dtype.
            rank: How many leading triplets the caller reads.
            keep: How many to keep when computing them (≥ ``rank``).
        """
        probe = matrix()
        found = self._lookup(fingerprint, key, probe.device, probe.dtype, rank)
        if found is not None:
            return found
        triplet = _truncate(torch.linalg.svd(probe, full_matrices=False), keep)
        self._keep(fingerprint, key, probe.device, probe.dtype, triplet)
        return triplet

    # --- one merge ------------------------------------------------------------------------------------

    def prepare(
        self,
        task_vectors: Sequence[TaskVector],
        keys: Sequence[str],
        *,
        device: torch.device,
        dtypes: dict[str, torch.dtype],
        shapes: dict[str, tuple[int, ...]],
        load: Loader,
        batched: bool = False,
        prefetch: bool = False,
        batch_bytes: int = 2**30,
        num_tasks: int | None = None,
    ) -> ExpertSet:
        """Make sure every expert's factors of ``keys`` are held (memory or file) before a merge reads them.

        Missing factors are computed key by key, or with ``batched`` all same-shaped keys of an expert (every
        block's ``mlp.c_fc.weight``...) through one solver call, at most ``batch_bytes`` of inputs at a time, and
        with ``prefetch`` the next batch loads while this one is factorized. With ``save`` the expert's file is
        (re)written, under its lock, with everything held for it. The engine calls this; ``load(index, key,
        dtype)`` returns expert ``index``'s slice of ``key`` on ``device``, checked for NaN/inf.

        Returns:
            The handle the merge uses to read factors per key.
        """
        num_tasks = num_tasks or len(task_vectors)
        device = _device(device)
        if self._anonymous:
            fingerprints = tuple(f"task {index}" for index in range(len(task_vectors)))
        else:
            fingerprints = tuple(tv.content_fingerprint() for tv in task_vectors)
        expert_set = ExpertSet(self, fingerprints, device)
        if self.reuse_bases:
            self._drop_derived_except(expert_set.name)
        for index, (tv, fingerprint) in enumerate(zip(task_vectors, fingerprints, strict=True)):
            for dtype in dict.fromkeys(dtypes[key] for key in keys):
                own = [key for key in keys if dtypes[key] == dtype]
                self._prepare_expert(
                    tv, index, fingerprint, own, device, dtype, shapes, num_tasks, load,
                    batched, prefetch, batch_bytes,
                )  # fmt: skip
        return expert_set

    def factorize(
        self,
        task_vector: TaskVector,
        *,
        num_tasks: int,
        device: str | torch.device | None = None,
        compute_dtype: torch.dtype | None = None,
        batched: bool | None = None,
    ) -> None:
        """Compute one expert's factors of every matrix key now, for later merges of ``num_tasks`` experts or more.

        E.g. in the job that trained it, so that a later evaluation job finds its factors file (with ``save``)
        instead of computing it. Same keys, dtype and device rules as
        :func:`~lightning_score.merging.merge_task_vectors`.
        """
        target = resolve_device(device)
        specs = {key: task_vector.tensor_spec(key) for key in task_vector}
        keys = [key for key, (shape, _) in specs.items() if is_matrix_key(key, tuple(shape))]
        dtypes = {key: compute_dtype or torch.promote_types(specs[key][1], torch.float32) for key in keys}

        def load(index: int, key: str, dtype: torch.dtype) -> Tensor:
            matrix = task_vector[key].to(device=target, dtype=dtype)
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError(f"Key '{key}' of {task_vector.describe()} has non-finite values (NaN or inf).")
            return matrix

        on_cuda = target.type == "cuda"
        self.prepare(
            [task_vector], keys, device=target, dtypes=dtypes, shapes={k: tuple(specs[k][0]) for k in keys},
            load=load, batched=on_cuda if batched is None else batched, prefetch=on_cuda, num_tasks=num_tasks,
        )  # fmt: skip

    def _prepare_expert(
        self,
        tv: TaskVector,
        index: int,
        fingerprint: str,
        keys: list[str],
        device: torch.device,
        dtype: torch.dtype,
        shapes: dict[str, tuple[int, ...]],
        num_tasks: int,
        load: Loader,
        batched: bool,
        prefetch: bool,
        batch_bytes: int,
    ) -> None:
        def missing() -> list[str]:
            self._file(tv, fingerprint, device, dtype)
            need = {key: min(shapes[key][-2:]) // num_tasks for key in keys}
            return [key for key in keys if self._available(fingerprint, key, device, dtype) < need[key]]

        todo = missing()
        path = self._path(tv, fingerprint, device, dtype)
        if not todo or path is None:
            self._compute(fingerprint, index, todo, device, dtype, shapes, num_tasks, load, batched, prefetch,
                          batch_bytes)  # fmt: skip
            return
        with factor_lock(path, self.lock_timeout):
            self._files.pop((fingerprint, str(device), str(dtype)), None)  # another process may have written it
            todo = missing()
            if not todo:
                return
            self._compute(fingerprint, index, todo, device, dtype, shapes, num_tasks, load, batched, prefetch,
                          batch_bytes)  # fmt: skip
            self._write(path, fingerprint, device, dtype, keys)

    def _compute(
        self,
        fingerprint: str,
        index: int,
        keys: list[str],
        device: torch.device,
        dtype: torch.dtype,
        shapes: dict[str, tuple[int, ...]],
        num_tasks: int,
        load: Loader,
        batched: bool,
        prefetch: bool,
        batch_bytes: int,
    ) -> None:
        groups: dict[tuple[int, ...], list[str]] = {}
        for key in keys:
            groups.setdefault(tuple(shapes[key]), []).append(key)
        chunks: list[list[str]] = []
        for shape, members in groups.items():
            per_chunk = 1
            if batched:
                per_chunk = max(1, batch_bytes // max(1, shape[-2] * shape[-1] * dtype.itemsize))
            chunks += [members[i : i + per_chunk] for i in range(0, len(members), per_chunk)]

        def load_chunk(chunk: list[str]) -> Tensor:
            matrices = [load(index, key, dtype) for key in chunk]
            return matrices[0] if len(chunk) == 1 else torch.stack(matrices)

        for chunk, matrices in prefetched(chunks, load_chunk, enabled=prefetch, device=device):
            factors = torch.linalg.svd(matrices, full_matrices=False)  # a [B, m, n] batch: one solver call
            for position, key in enumerate(chunk):
                triplet = factors if len(chunk) == 1 else tuple(f[position] for f in factors)
                kept = _truncate(triplet, self._rank_to_keep(shapes[key], num_tasks))  # type: ignore[arg-type]
                self._keep(fingerprint, key, device, dtype, kept)
            del factors, matrices

    def _write(self, path: Path, fingerprint: str, device: torch.device, dtype: torch.dtype, keys: list[str]) -> None:
        """Rewrite the expert's file with everything known for it: the old file's keys and the new ones."""
        old = open_factor_file(path, fingerprint, device, dtype)
        entries: dict[str, Triplet] = {}
        for key in dict.fromkeys([*(old.ranks if old else {}), *keys]):
            held = self._get(("factors", fingerprint, key, str(device), str(dtype)))
            on_file = old.rank(key) if old is not None else 0
            if held is not None and held[1].shape[-1] >= on_file:
                entries[key] = held
            elif old is not None and on_file:
                entries[key] = old.read(key)
        write_factor_file(path, fingerprint, device, dtype, entries)
        self.stats["files_written"] += 1
        self._files[(fingerprint, str(device), str(dtype))] = open_factor_file(path, fingerprint, device, dtype)
        log.debug("Wrote the factors of %d keys to '%s'.", len(entries), path)


# --- what one merge reads, key by key -----------------------------------------------------------------


class ExpertSet:
    """The experts of one merge, in order, as a :class:`FactorCache` knows them (from :meth:`FactorCache.prepare`)."""

    def __init__(self, cache: FactorCache, fingerprints: tuple[str, ...], device: torch.device) -> None:
        self.cache = cache
        self.fingerprints = fingerprints
        self.device = device
        self.name = (fingerprints, str(device))

    def key(self, key: str, deltas: Tensor) -> KeyFactors:
        """What the merge of ``key`` may reuse; ``deltas`` is the ``[T, m, n]`` tensor the engine loaded for it."""
        return KeyFactors(self, key, deltas)


class KeyFactors:
    """What a method merging one key may reuse instead of computing: per-task SVDs and derived results.

    Methods receive it as ``factors=`` from the engine (see :meth:`KeyMerger.factorized_keys`). Both calls
    take the ``deltas`` the method is merging and fall back to computing from them when those are not the
    exact tensor the engine loaded (a method that transformed them first), so a method can never read factors
    of other inputs.
    """

    def __init__(self, experts: ExpertSet, key: str, deltas: Tensor) -> None:
        self._experts = experts
        self._key = key
        self._deltas = deltas
        self._version = deltas._version

    def _owns(self, deltas: Tensor) -> bool:
        return deltas is self._deltas and deltas._version == self._version

    def leading(self, deltas: Tensor, k: int, sign_convention: str = "svd") -> Triplet:
        """Each task's k leading singular triplets: ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``.

        Bit-identical to :func:`~lightning_score.merging.shared_basis.leading_triplets` of ``deltas``.
        """
        if not self._owns(deltas):
            return leading_triplets(deltas, k, sign_convention)
        cache, num_tasks = self._experts.cache, deltas.shape[0]
        keep = cache._rank_to_keep(tuple(deltas.shape), num_tasks)
        parts = [
            cache.triplets(fingerprint, self._key, lambda t=t: deltas[t], k, keep)
            for t, fingerprint in enumerate(self._experts.fingerprints)
        ]
        U = torch.stack([U_t[:, :k] for U_t, _, _ in parts])
        S = torch.stack([S_t[:k] for _, S_t, _ in parts])
        Vh = torch.stack([Vh_t[:k] for _, _, Vh_t in parts])
        if sign_convention == "canonical":
            U, Vh = canonicalize_signs(U, Vh)
        return U, S, Vh

    def reuse(self, deltas: Tensor, name: Hashable, compute: Callable[[], Derived]) -> Derived:
        """``compute()``'s result for this key and these experts, computed once per set of experts.

        Args:
            deltas: The tensor being merged (the result is reused only for the engine's own).
            name: What is computed, with every option it depends on, e.g. ``("shared_basis", "svd")``.
            compute: Computes it from ``deltas`` (and :meth:`leading`).
        """
        cache = self._experts.cache
        if not cache.reuse_bases or not self._owns(deltas):
            return compute()
        slot = ("derived", self._experts.name, self._key, str(deltas.dtype), name)
        value = cache._get(slot)
        if value is not None:
            cache.stats["derived_reused"] += 1
            return value
        value = compute()
        cache.stats["derived_computed"] += 1
        cache._put(slot, value)
        return value
