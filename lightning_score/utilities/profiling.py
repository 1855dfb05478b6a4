"""Wall time and peak memory of a block of work, on CPU or CUDA (for merge reports and benchmarks)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from types import TracebackType

import torch

__all__ = ["Measure"]


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc), so the resident-set baseline reflects live data only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline may include freed memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_bytes() -> int:
    """Anonymous resident memory (heap): memory-mapped task-vector files, which the OS can drop, do not count."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak (an upper bound)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Measure:
    """Time a block and record how far memory rose above where it started.

    On CUDA the allocator's peak is exact; on CPU the anonymous resident memory (``RssAnon``: the heap, not
    memory-mapped files) is sampled every 2 ms by a thread. Freed memory the C library keeps for reuse lowers
    later measurements in the same process, so compare peaks measured in fresh processes.

    Args:
        device: The device the work runs on.

    Example:
        >>> with Measure("cpu") as measure:
        ...     _ = sum(range(1000))
        >>> measure.seconds >= 0 and measure.peak_bytes >= 0
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self.peak_bytes = 0

    def __enter__(self) -> Measure:
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _resident_bytes()
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _resident_bytes())
            time.sleep(0.002)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self._start
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, _resident_bytes()) - self._base
