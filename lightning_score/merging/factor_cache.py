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

The steps live in modules of their own: :mod:`~lightning_score.merging.factor_plan` (one merge's settings and
its solver calls), :mod:`~lightning_score.merging.lru` (the memory), :class:`~lightning_score.merging.factor_files.
FactorStore` (an expert's file) and :mod:`~lightning_score.merging.key_factors` (what a merge reads, per key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from lightning_score.merging.factor_files import FactorStore, Triplet, factor_path
from lightning_score.merging.factor_plan import FactorPlan, Loader
from lightning_score.merging.key_factors import ExpertSet
from lightning_score.merging.keys import is_matrix_key, resolve_device
from lightning_score.merging.lru import LRUStore
from lightning_score.task_vector import TaskVector

__all__ = ["FactorCache"]

log = logging.getLogger(__name__)

Derived = TypeVar("Derived")


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
        self._memory = LRUStore(max_bytes)  # factors and derived results, least recently used dropped first
        self._stores: dict[tuple[str, str, str], FactorStore] = {}  # (fingerprint, device, dtype): the file
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
        return self._memory.nbytes

    def clear(self) -> None:
        """Drop everything held in memory (files stay)."""
        self._memory.clear()

    def derived(self, experts: Hashable, what: Hashable, compute: Callable[[], Derived]) -> Derived:
        """``compute()``'s result for the set of experts named ``experts``, computed once while that set is kept.

        Args:
            experts: The set of experts (:attr:`ExpertSet.name`); :meth:`prepare` of another set drops its results.
            what: What is computed, for which key and dtype, with every option it depends on.
            compute: Computes it.
        """
        name = ("derived", experts, what)
        value = self._memory.get(name)
        if value is not None:
            self.stats["derived_reused"] += 1
            return value
        value = compute()
        self.stats["derived_computed"] += 1
        self._memory.put(name, value)
        return value

    # --- factors of one expert --------------------------------------------------------------------

    def rank_to_keep(self, shape: tuple[int, ...], num_tasks: int) -> int:
        """How many leading triplets of a ``[..., m, n]`` key to keep for a merge of ``num_tasks`` experts.

        max(⌊r/T⌋, ⌊r/``min_tasks``⌋) of r = min(m, n): what this merge and every merge of at least
        ``min_tasks`` experts read.
        """
        r = min(shape[-2], shape[-1])
        return max(r // num_tasks, r // self.min_tasks)

    def _store(self, tv: TaskVector, fingerprint: str, device: torch.device, dtype: torch.dtype) -> FactorStore:
        """The expert's factor file for ``device`` and ``dtype``, opened once (a path only with ``save``)."""
        name = (fingerprint, str(device), str(dtype))
        if name not in self._stores:
            path = (
                factor_path(fingerprint, device, dtype, beside=tv.path, directory=self.directory) if self.save else None
            )
            self._stores[name] = FactorStore(path, fingerprint, device, dtype)
        return self._stores[name]

    def _available(self, store: FactorStore, key: str) -> int:
        """How many leading triplets of a key are held, in memory or in the expert's file (none read)."""
        held = self._memory.peek(("factors", store.fingerprint, key, str(store.device), str(store.dtype)))
        return max(held[1].shape[-1] if held is not None else 0, store.rank(key))

    def _lookup(
        self, fingerprint: str, key: str, device: torch.device, dtype: torch.dtype, rank: int
    ) -> Triplet | None:
        """Leading triplets of at least ``rank`` from memory, else from the expert's file, else None."""
        name = ("factors", fingerprint, key, str(device), str(dtype))
        triplet = self._memory.get(name)
        if triplet is not None and triplet[1].shape[-1] >= rank:
            self.stats["svd_from_memory"] += 1
            return triplet
        store = self._stores.get((fingerprint, str(device), str(dtype)))
        if store is not None and store.rank(key) >= rank:
            triplet = tuple(t.to(device) for t in store.read(key))
            self._memory.put(name, triplet)
            self.stats["svd_from_file"] += 1
            return triplet
        return None

    def _keep(self, fingerprint: str, key: str, device: torch.device, dtype: torch.dtype, triplet: Triplet) -> None:
        self.stats["svd_computed"] += 1
        self._memory.put(("factors", fingerprint, key, str(device), str(dtype)), triplet)

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
        plan = FactorPlan(
            device=_device(device),
            dtypes=dtypes,
            shapes=shapes,
            num_tasks=num_tasks or len(task_vectors),
            load=load,
            batched=batched,
            prefetch=prefetch,
            batch_bytes=batch_bytes,
        )
        if self._anonymous:
            fingerprints = tuple(f"task {index}" for index in range(len(task_vectors)))
        else:
            fingerprints = tuple(tv.content_fingerprint() for tv in task_vectors)
        expert_set = ExpertSet(self, fingerprints, plan.device)
        if self.reuse_bases:
            self._memory.discard(lambda name: name[0] == "derived" and name[1] != expert_set.name)
        for index, (tv, fingerprint) in enumerate(zip(task_vectors, fingerprints, strict=True)):
            for dtype in dict.fromkeys(dtypes[key] for key in keys):
                store = self._store(tv, fingerprint, plan.device, dtype)
                self._prepare_expert(plan, index, store, [key for key in keys if dtypes[key] == dtype])
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

        def load(index: int, key: str, dtype: torch.dtype) -> Tensor:
            matrix = task_vector[key].to(device=target, dtype=dtype)
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError(f"Key '{key}' of {task_vector.describe()} has non-finite values (NaN or inf).")
            return matrix

        on_cuda = target.type == "cuda"
        self.prepare(
            [task_vector],
            keys,
            device=target,
            dtypes={key: compute_dtype or torch.promote_types(specs[key][1], torch.float32) for key in keys},
            shapes={key: tuple(specs[key][0]) for key in keys},
            load=load,
            batched=on_cuda if batched is None else batched,
            prefetch=on_cuda,
            num_tasks=num_tasks,
        )

    def _prepare_expert(self, plan: FactorPlan, index: int, store: FactorStore, keys: list[str]) -> None:
        """Compute what the merge reads of expert ``index``'s ``keys`` and is not held; with a file, write it."""

        def missing() -> list[str]:
            return [key for key in keys if self._available(store, key) < plan.needed(key)]

        todo = missing()
        if todo and not store.writable:
            self._compute(plan, index, store, todo)
        elif todo:
            with store.locked(self.lock_timeout):  # another process may have written it meanwhile
                todo = missing()
                if todo:
                    self._compute(plan, index, store, todo)
                    if store.writable:  # not a file of a newer release, written meanwhile
                        self._write(store, keys)

    def _compute(self, plan: FactorPlan, index: int, store: FactorStore, keys: list[str]) -> None:
        """Factorize expert ``index``'s ``keys`` and keep what later merges read."""
        for key, triplet in plan.factorize(index, keys, store.dtype):
            kept = _truncate(triplet, self.rank_to_keep(plan.shapes[key], plan.num_tasks))
            self._keep(store.fingerprint, key, plan.device, store.dtype, kept)

    def _write(self, store: FactorStore, keys: list[str]) -> None:
        """Rewrite the expert's file with everything known for it: the file's keys and ``keys``, held or on file."""
        entries: dict[str, Triplet] = {}
        for key in dict.fromkeys([*store.ranks, *keys]):
            held = self._memory.get(("factors", store.fingerprint, key, str(store.device), str(store.dtype)))
            if held is not None:
                entries[key] = held
        count = store.write(entries)
        self.stats["files_written"] += 1
        log.debug("Wrote the factors of %d keys to '%s'.", count, store.path)
