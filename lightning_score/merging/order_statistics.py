"""Exact order statistics over a whole model, streamed one key at a time (for TIES and PCB).

TIES keeps each task's top 20 % entries over ALL keys, PCB clips at 1 %/99 % and drops below 95 %: both
need the exact k-th smallest of P numbers per task (at ranks given by the method), P being every entry of
the model. Holding all P
numbers of a ViT-L/14 per task would break the engine's one-key-at-a-time memory bound, so this is a
radix select: each float maps to an integer with the same order, and one pass over the model per
16-bit digit (two for float32, four for float64) narrows every task's k-th value down to its exact bits,
with a 65,536-bin histogram per task as the only state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["kth_smallest"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_INT_VIEW = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


def _ordered_keys(values: Tensor) -> Tensor:
    """Signed integers with the same order as the floats (−0.0 sorts just below +0.0)."""
    int_dtype, bits = _INT_VIEW[values.dtype]
    raw = values.contiguous().view(int_dtype)
    magnitude_mask = (1 << (bits - 1)) - 1
    return raw ^ ((raw >> (bits - 1)) & magnitude_mask)


def _floats_from_keys(keys: Tensor, dtype: torch.dtype) -> Tensor:
    int_dtype, bits = _INT_VIEW[dtype]
    keys = keys.to(int_dtype)
    magnitude_mask = (1 << (bits - 1)) - 1
    return (keys ^ ((keys >> (bits - 1)) & magnitude_mask)).view(dtype)


def _digit(keys: Tensor, shift: int, top: bool) -> Tensor:
    """The 16-bit digit of each key starting at bit ``shift``, in [0, 65535] (the top one offset to unsigned)."""
    shifted = keys >> shift
    return (shifted.to(torch.int64) + (1 << (_DIGIT_BITS - 1))) if top else (shifted & (_BINS - 1)).to(torch.int64)


def kth_smallest(chunks: Callable[[], Iterable[Tensor]], ranks: Tensor) -> Tensor:
    """The exact ``ranks``-th smallest number of each of T streams, reading the streams a few times.

    Args:
        chunks: Called once per pass; returns an iterable of ``[T, n_i]`` float32 or float64 tensors that
            together hold each task's numbers (the same chunks in the same order every call).
        ranks: ``[T, Q]`` integer tensor of 1-indexed ranks (Q order statistics per task at once).

    Returns:
        ``[T, Q]`` tensor of the selected values, in the chunks' dtype, on the chunks' device.

    Example:
        >>> import torch
        >>> x = torch.tensor([[3.0, -1.0, 2.0, 2.0], [0.5, 0.25, -4.0, 8.0]])
        >>> kth_smallest(lambda: [x[:, :2], x[:, 2:]], torch.tensor([[1, 3], [4, 2]]))
        tensor([[-1.0000,  2.0000],
                [ 8.0000,  0.2500]])
    """
    first = next(iter(chunks()))
    dtype, device = first.dtype, first.device
    if dtype not in _INT_VIEW:
        raise TypeError(f"kth_smallest works on float32 or float64 numbers, got {dtype}.")
    bits = _INT_VIEW[dtype][1]
    num_tasks, num_ranks = ranks.shape
    remaining = ranks.to(device=device, dtype=torch.int64).clone()  # rank within the current prefix
    prefix = torch.zeros(num_tasks, num_ranks, dtype=torch.int64, device=device)  # chosen high digits so far
    offsets = torch.arange(num_tasks * num_ranks, device=device).view(num_tasks, num_ranks, 1) * _BINS
    for position, shift in enumerate(range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS)):
        top = position == 0
        histogram = torch.zeros(num_tasks * num_ranks * _BINS, dtype=torch.int64, device=device)
        for chunk in chunks():
            keys = _ordered_keys(chunk).unsqueeze(1)  # [T, 1, n]
            digits = _digit(keys, shift, top).expand(num_tasks, num_ranks, -1)
            if top:
                selected = torch.ones_like(digits, dtype=torch.bool)
            else:  # only numbers whose higher digits match the prefix chosen so far
                higher = (keys >> (shift + _DIGIT_BITS)).to(torch.int64)
                selected = higher == prefix.unsqueeze(-1)
            histogram += torch.bincount((digits + offsets)[selected], minlength=histogram.numel())
        counts = histogram.view(num_tasks, num_ranks, _BINS).cumsum(dim=-1)
        total = counts[..., -1]
        if bool((remaining > total).any()) or bool((remaining < 1).any()):
            raise ValueError(f"Rank out of range: ranks {ranks.tolist()} for streams of {total.tolist()} numbers.")
        chosen = torch.searchsorted(counts, remaining.unsqueeze(-1)).squeeze(-1)  # first digit with count ≥ rank
        below = torch.where(
            chosen > 0, torch.gather(counts, -1, (chosen - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1), 0
        )
        remaining -= below
        digit_value = chosen - (1 << (_DIGIT_BITS - 1)) if top else chosen
        prefix = digit_value if top else (prefix << _DIGIT_BITS) | chosen
    return _floats_from_keys(prefix, dtype)
