"""A least-recently-used store bounded by the bytes of the tensors it holds: the memory of a :class:`FactorCache`.

Values are tensors or (nested) tuples and lists of them; anything else counts as 0 bytes. With ``max_bytes`` the
store drops its least recently used entries until the bound holds again; a value larger than the bound on its own
is not stored at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from torch import Tensor

__all__ = ["LRUStore", "nbytes_of"]


def nbytes_of(value: Any) -> int:
    """The bytes of the tensors in ``value`` (a tensor, or tuples and lists of them; 0 for anything else).

    Example:
        >>> import torch
        >>> nbytes_of((torch.zeros(3, 4), [torch.zeros(2, dtype=torch.float64)], "name"))
        64
    """
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(part) for part in value)
    return 0


class LRUStore:
    """Named values, the least recently used dropped first once they hold more than ``max_bytes``.

    Args:
        max_bytes: The bound on :attr:`nbytes`; None: no bound.

    Example:
        >>> import torch
        >>> store = LRUStore(max_bytes=32)
        >>> store.put("a", torch.zeros(4)); store.put("b", torch.zeros(4))  # 16 bytes each
        True
        True
        >>> _ = store.get("a")                    # "a" is now the most recently used
        >>> store.put("c", torch.zeros(4))        # over the bound: "b" goes
        True
        >>> list(store), store.nbytes
        (['a', 'c'], 32)
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"LRUStore: max_bytes must be ≥ 0 or None, got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """The bytes held now."""
        return self._bytes

    def get(self, name: Hashable) -> Any:
        """The value stored under ``name`` (None if none), which becomes the most recently used."""
        value = self._values.get(name)
        if value is not None:
            self._values.move_to_end(name)
        return value

    def peek(self, name: Hashable) -> Any:
        """The value stored under ``name`` (None if none), leaving the order of use as it is."""
        return self._values.get(name)

    def put(self, name: Hashable, value: Any) -> bool:
        """Store ``value`` under ``name`` as the most recently used, then drop the least recently used over the bound.

        Returns:
            False when ``value`` alone is larger than ``max_bytes``: it is not stored, and what ``name`` held stays.
        """
        size = nbytes_of(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        self._bytes -= nbytes_of(self._values.pop(name, None))
        self._values[name] = value
        self._bytes += size
        while self.max_bytes is not None and self._bytes > self.max_bytes:
            _, evicted = self._values.popitem(last=False)
            self._bytes -= nbytes_of(evicted)
        return True

    def discard(self, drop: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose name ``drop(name)`` is true of."""
        for name in [name for name in self._values if drop(name)]:
            self._bytes -= nbytes_of(self._values.pop(name))

    def clear(self) -> None:
        """Drop everything."""
        self._values.clear()
        self._bytes = 0

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[Hashable]:
        """The names, least recently used first."""
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)
