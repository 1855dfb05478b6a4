"""Overlap loading the next piece of work with computing the current one.

The merge engine reads one key's T slices at a time (from memory-mapped files, converted and copied to the
compute device); on a GPU that copy can run while the previous key is being merged. :func:`prefetched` loads
item i+1 in a background thread, on its own CUDA stream, while the caller works on item i; the caller's
stream waits for the copy before using it. Results are the same tensors, so merges stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from lightning_score.merging.task_matrices import LowRankUpdate, TaskMatrices

__all__ = ["prefetched"]

Item = TypeVar("Item")
Value = TypeVar("Value")


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for part in value:
            yield from _tensors(part)
    elif isinstance(value, TaskMatrices):
        yield from _tensors(value.parts)
    elif isinstance(value, LowRankUpdate):
        yield from (value.B, value.A)


def prefetched(
    items: Sequence[Item], load: Callable[[Item], Value], *, enabled: bool, device: torch.device
) -> Iterator[tuple[Item, Value]]:
    """Yield ``(item, load(item))`` in order, loading the next item in the background when ``enabled``.

    Args:
        items: What to load, in order.
        load: Reads one item (tensors on ``device``); an error it raises is raised at that item.
        enabled: Load ahead in a background thread; with False this is a plain loop.
        device: The device the loaded tensors live on (a CUDA device gets a side stream for the copies).

    Yields:
        Each item with its loaded value, ready to use on the caller's current stream.
    """
    if not enabled or not items:
        for item in items:
            yield item, load(item)
        return
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def task(item: Item) -> tuple[Value, torch.cuda.Event | None]:
        if side is None:
            return load(item), None
        with torch.cuda.stream(side):
            value = load(item)
            event = torch.cuda.Event()
            event.record(side)
        return value, event

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-score-prefetch") as pool:
        pending: Future[tuple[Value, torch.cuda.Event | None]] | None = pool.submit(task, items[0])
        for index, item in enumerate(items):
            assert pending is not None
            value, event = pending.result()
            pending = pool.submit(task, items[index + 1]) if index + 1 < len(items) else None
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for tensor in _tensors(value):
                    if tensor.is_cuda:
                        tensor.record_stream(current)  # the side stream allocated it; keep it until the caller is done
            yield item, value
