"""A command stopped by a signal says so: which signal, what is unfinished, and a non-zero exit status.

Lightning stops a fit on SIGTERM (SLURM's time limit or preemption, ``kill``) at the end of the current batch by
raising ``SIGTERMException``, a ``SystemExit`` whose status is 0, and turns Ctrl+C inside a run into
``sys.exit(1)``; outside a run, SIGTERM ends the process without a word. :func:`watch_signals` records which
signal came, so the command can end with one line and status ``128 + signal number`` (:class:`StoppedBySignal`).

It leaves Lightning's own handling in place. During a Trainer run Lightning installs its SIGTERM handler and
calls the one found before it (this one) after its own: the run still stops at a batch end, writing nothing
partial, and this handler only records the signal. Outside a run, this handler stops the command at once
(``SIGTERMException`` for SIGTERM, ``KeyboardInterrupt`` for SIGINT). SIGUSR1 is not touched: Lightning
registers its SLURM requeue handler (``SLURMEnvironment(auto_requeue=True)``) only where none is installed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["WATCHED_SIGNALS", "SignalWatch", "StoppedBySignal", "watch_signals"]

WATCHED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals :func:`watch_signals` records."""


@dataclass
class SignalWatch:
    """What :func:`watch_signals` saw.

    Attributes:
        signum: The first watched signal received, or ``None``.
    """

    signum: int | None = None

    @property
    def name(self) -> str:
        """The signal's name, e.g. ``"SIGTERM"`` (``""`` when none came)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def stopped(self, error: BaseException) -> bool:
        """Whether ``error`` is how a watched signal ended the work (a ``SystemExit`` or ``KeyboardInterrupt``)."""
        return self.signum is not None and isinstance(error, SystemExit | KeyboardInterrupt)


class StoppedBySignal(SystemExit):
    """The work was stopped by a signal: exit status ``128 + signum``, and a message saying what is unfinished.

    Args:
        signum: The signal.
        message: The one line already told to the user.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message


@contextlib.contextmanager
def watch_signals(watch: SignalWatch | None = None) -> Iterator[SignalWatch]:
    """Record SIGTERM and SIGINT while the block runs (the handlers before it come back after it).

    Outside the main thread (where Python allows no handler) nothing is installed and nothing is recorded.

    Args:
        watch: Where to record the signal (default: a new one, yielded).

    Example:
        >>> import os
        >>> with watch_signals() as watch:
        ...     try:
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ...     except SystemExit as error:
        ...         stopped = watch.stopped(error)
        >>> stopped, watch.name
        (True, 'SIGTERM')
    """
    watch = SignalWatch() if watch is None else watch
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if watch.signum is None:
            watch.signum = signum
        if signal.getsignal(signum) is not handler:
            return  # called by Lightning's handler inside a run, which stops the run at the end of the batch
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SIGTERMException

    previous = {signum: signal.getsignal(signum) for signum in WATCHED_SIGNALS}
    for signum in WATCHED_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield watch
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)
