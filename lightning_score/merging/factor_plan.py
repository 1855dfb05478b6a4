"""What one merge asks a :class:`~lightning_score.merging.FactorCache` to factorize, and in which batches.

:class:`FactorPlan` holds the settings of one :meth:`FactorCache.prepare <lightning_score.merging.FactorCache.prepare>`
call (the compute device, each key's dtype and shape, the number of experts merged, how to load a task's slice,
whether to batch and prefetch) as one object, so that they travel together instead of as a dozen parameters.
:meth:`FactorPlan.chunks` splits an expert's keys into the solver calls: one key per call, or with ``batched`` every
same-shaped key (every block's ``mlp.c_fc.weight``...) stacked, at most ``batch_bytes`` of inputs per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_score.merging.factor_files import Triplet
from lightning_score.merging.prefetch import prefetched

__all__ = ["FactorPlan", "Loader"]

Loader = Callable[[int, str, torch.dtype], Tensor]
"""``load(task index, key, dtype)``: one task's slice of a key on the compute device."""


@dataclass(frozen=True)
class FactorPlan:
    """The settings of one merge's factorizations.

    Attributes:
        device: The compute device, with its index (``cuda:0``, not ``cuda``).
        dtypes: Each key's compute dtype.
        shapes: Each key's shape (``[..., m, n]``).
        num_tasks: How many experts the merge combines (T): it reads ⌊r/T⌋ triplets of each.
        load: ``load(index, key, dtype)``, expert ``index``'s slice of ``key`` on ``device``, checked for NaN/inf.
        batched: Factorize same-shaped keys of an expert through one batched solver call.
        prefetch: Load the next batch in a background thread while this one is factorized.
        batch_bytes: With ``batched``, the most bytes of inputs per solver call (at least one key).

    Example:
        >>> import torch
        >>> shapes = {"a": (4, 3), "b": (4, 3), "c": (2, 5)}
        >>> plan = FactorPlan(torch.device("cpu"), dict.fromkeys(shapes, torch.float32), shapes, 2, lambda *a: None,
        ...                   batched=True, batch_bytes=48)
        >>> plan.chunks(["a", "b", "c"], torch.float32), plan.needed("a"), plan.needed("c")
        ([['a'], ['b'], ['c']], 1, 1)
        >>> together = FactorPlan(plan.device, plan.dtypes, shapes, 2, plan.load, batched=True)
        >>> together.chunks(["a", "b", "c"], torch.float32)
        [['a', 'b'], ['c']]
    """

    device: torch.device
    dtypes: Mapping[str, torch.dtype]
    shapes: Mapping[str, tuple[int, ...]]
    num_tasks: int
    load: Loader
    batched: bool = False
    prefetch: bool = False
    batch_bytes: int = 2**30

    def needed(self, key: str) -> int:
        """How many leading triplets of each expert's ``key`` the merge reads: ⌊min(m, n)/T⌋."""
        return min(self.shapes[key][-2:]) // self.num_tasks

    def chunks(self, keys: Sequence[str], dtype: torch.dtype) -> list[list[str]]:
        """``keys`` (all of ``dtype``) as the solver calls that factorize them: grouped by shape, in order.

        One key per call, or with :attr:`batched` as many same-shaped keys as fit in :attr:`batch_bytes`.
        """
        groups: dict[tuple[int, ...], list[str]] = {}
        for key in keys:
            groups.setdefault(tuple(self.shapes[key]), []).append(key)
        chunks: list[list[str]] = []
        for shape, members in groups.items():
            per_chunk = 1
            if self.batched:
                per_chunk = max(1, self.batch_bytes // max(1, shape[-2] * shape[-1] * dtype.itemsize))
            chunks += [members[i : i + per_chunk] for i in range(0, len(members), per_chunk)]
        return chunks

    def load_chunk(self, index: int, chunk: Sequence[str], dtype: torch.dtype) -> Tensor:
        """Expert ``index``'s slices of the keys of one chunk: one ``[m, n]`` matrix, or a ``[B, m, n]`` stack."""
        matrices = [self.load(index, key, dtype) for key in chunk]
        return matrices[0] if len(chunk) == 1 else torch.stack(matrices)

    def factorize(self, index: int, keys: Sequence[str], dtype: torch.dtype) -> Iterator[tuple[str, Triplet]]:
        """Each of expert ``index``'s ``keys`` (all of ``dtype``) with its full thin SVD ``(U, S, Vh)``, in chunk order.

        One ``torch.linalg.svd`` call per chunk of :meth:`chunks`; with :attr:`prefetch` the next chunk loads while
        this one is factorized. A stacked chunk yields slices of the batch's factors (copy what you keep).
        """
        chunks = self.chunks(keys, dtype)

        def load(chunk: list[str]) -> Tensor:
            return self.load_chunk(index, chunk, dtype)

        for chunk, matrices in prefetched(chunks, load, enabled=self.prefetch, device=self.device):
            factors = torch.linalg.svd(matrices, full_matrices=False)  # a [B, m, n] batch: one solver call
            for position, key in enumerate(chunk):
                yield key, factors if len(chunk) == 1 else tuple(f[position] for f in factors)  # type: ignore[misc]
            del factors, matrices
