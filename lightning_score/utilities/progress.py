"""Progress as log lines, for output that is not a terminal (a log file, a SLURM job's output).

A progress bar draws only on a terminal; redirected to a file it says nothing until the work ends. Where no
terminal is attached, long work reports one line every few percent or every minute instead, whichever comes
first: ``what: step/total (percent), elapsed, about how long is left``. :class:`ProgressLines` keeps the count
and the clock; :class:`LogTrainingProgress` is the Lightning callback that feeds it a fit's optimiser steps;
:func:`forward_log_lines` hands a library logger's lines to whoever writes the progress (a study's own lines).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["LogTrainingProgress", "ProgressLines", "format_seconds", "forward_log_lines"]


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour), as progress bars show it.

    Example:
        >>> format_seconds(75.4), format_seconds(3725)
        ('1:15', '1:02:05')
    """
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressLines:
    """Emit ``what: done/total (p %), elapsed m:ss, ~m:ss left`` every ``percent`` % or ``seconds``, whichever first.

    Args:
        what: What is counted, e.g. ``"fine-tuning rot0 (seed 0): step"``.
        total: The count at the end.
        emit: Called with each line (a logger's ``info``, the study's own line writer...).
        percent: A line each time this many more percent are done.
        seconds: A line at least this often (at the next update after it).
        start: The count already done when it starts (a resumed fit's restored step).
        clock: Seconds, monotonic (for tests).

    Example:
        >>> ticks = iter([0.0, 1.0, 2.0, 3.0, 4.0])
        >>> lines = []
        >>> progress = ProgressLines("step", 4, lines.append, percent=50, seconds=60, clock=lambda: next(ticks))
        >>> for done in range(1, 5):
        ...     progress.update(done)
        >>> lines
        ['step 2/4 (50 %), elapsed 0:02, ~0:02 left', 'step 4/4 (100 %), elapsed 0:04']
    """

    def __init__(
        self,
        what: str,
        total: int,
        emit: Callable[[str], None],
        *,
        percent: float = 10.0,
        seconds: float = 60.0,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.emit = what, max(int(total), 1), emit
        self.percent, self.seconds, self.clock, self.start = percent, seconds, clock, start
        self.started = clock()
        self._last_time, self._last_done = self.started, start

    def update(self, done: int) -> None:
        """Report ``done`` if enough percent or time has passed since the last line (always at the end)."""
        now = self.clock()
        step = self.total * self.percent / 100
        if done <= self._last_done:
            return
        if done < self.total and done - self._last_done < step and now - self._last_time < self.seconds:
            return
        self._last_time, self._last_done = now, done
        elapsed = now - self.started
        line = f"{self.what} {done}/{self.total} ({100 * done / self.total:.0f} %), elapsed {format_seconds(elapsed)}"
        if done < self.total:
            line += f", ~{format_seconds(elapsed / (done - self.start) * (self.total - done))} left"
        self.emit(line)


class LogTrainingProgress(Callback):
    """Log a fit's optimiser steps as :class:`ProgressLines` (for output that is not a terminal).

    The total is ``trainer.estimated_stepping_batches`` (``max_steps``, or the epochs' steps).

    Args:
        what: The fit, e.g. ``"fine-tuning rot0 (seed 0)"``; lines read ``<what>: step 30/150 (20 %), …``.
        emit: Called with each line.
        percent: A line every this many percent of the steps.
        seconds: And at least once a minute (default).
    """

    def __init__(self, what: str, emit: Callable[[str], None], percent: float = 10.0, seconds: float = 60.0) -> None:
        self.what, self.emit, self.percent, self.seconds = what, emit, percent, seconds
        self._lines: ProgressLines | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the count (from the restored step, when resuming)."""
        total, start = int(trainer.estimated_stepping_batches), trainer.global_step
        self._lines = ProgressLines(
            f"{self.what}: step", total, self.emit, percent=self.percent, seconds=self.seconds, start=start
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Report the step count when a line is due (rank zero only)."""
        if self._lines is not None and trainer.is_global_zero:
            self._lines.update(trainer.global_step)


class _Emit(logging.Handler):
    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit(record.getMessage())


@contextlib.contextmanager
def forward_log_lines(name: str, emit: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, logger ``name``'s INFO and higher lines go to ``emit`` only (not to its parents)."""
    logger = logging.getLogger(name)
    handler, level, propagate = _Emit(emit), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
