"""A study on several devices or nodes: every rank walks the same steps; rank zero decides and writes.

With ``devices × num_nodes > 1`` the study starts its processes through Lightning's own launcher
(:meth:`lightning.fabric.Fabric.launch`, the same ``ddp`` launcher a Trainer uses): on one machine it re-runs
the command once per further device; under ``torchrun`` or SLURM's ``srun`` the processes already exist and
Lightning reads their ranks from the environment. Every rank then runs the whole study, step by step:

* each fit is a ``Trainer(strategy="ddp")`` fit across all ranks (the task vector is written once, by
  :class:`~lightning_score.ScoreMergeCallback` on rank zero);
* each merge is sharded across the ranks by :class:`~lightning_score.MergeModule`;
* each evaluation predicts a contiguous run of whole test batches per rank (:func:`batch_shard`; no
  distributed sampler, so no image is padded in or dropped), and the per-image predictions are gathered to
  every rank in the test set's order: the numbers are exactly those of one device;
* every decision that reads the study folder (reuse a kept fit or result?) is taken on rank zero and
  broadcast (:meth:`World.on_zero`), and every file is written there, so the ranks never disagree; an error
  there is raised on every rank. An error on one rank inside a fit or a prediction (where the others may
  wait in Lightning's own collectives) ends that process, and the launcher ends the others: Lightning's
  launcher watches the ranks it started (and the study kills them when rank zero fails,
  :meth:`World.stop_others`), torchrun stops its workers, ``srun --kill-on-bad-exit=1`` its tasks. Never a hang;
* where two jobs of a cluster study can race (the same fit or the same result), rank zero holds an
  inter-process file lock (:meth:`World.lock`) while the ranks wait in short polls.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import filelock
import lightning as L

from lightning_score.utilities.ranks import gather_outcomes, on_rank_zero

__all__ = ["World", "batch_shard"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_POLL_SECONDS = 5.0
"""How long rank zero tries a busy lock before the ranks exchange a heartbeat (well under any collective timeout)."""


def batch_shard(count: int, batch_size: int, rank: int, world_size: int) -> range:
    """The image indices rank ``rank`` evaluates: a contiguous run of whole batches of ``batch_size``.

    The batches of the test set (the last one possibly short) are dealt out in order, the first ranks taking
    one more when they do not divide evenly. The shards are disjoint, cover every image exactly once, and
    concatenated in rank order give the original order; each rank's batches are exactly the batches one
    process would form, so per-image predictions equal the single-device ones bit for bit.

    Args:
        count: Number of images.
        batch_size: The evaluation batch size.
        rank: This process's global rank.
        world_size: Number of processes.

    Returns:
        The indices, possibly empty (more ranks than batches).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_shard: need batch_size, world_size >= 1 and 0 <= rank < world_size; got "
                         f"{batch_size}, {world_size}, {rank}.")  # fmt: skip
    batches = -(-count // batch_size)
    per_rank, extra = divmod(batches, world_size)
    first = rank * per_rank + min(rank, extra)
    last = first + per_rank + (1 if rank < extra else 0)
    return range(min(first * batch_size, count), min(last * batch_size, count))


class World:
    """The processes of one study: a single process, or a DDP world started by Lightning's launcher.

    Args:
        fabric: The launched :class:`lightning.fabric.Fabric` (its strategy carries the collectives), or
            ``None`` for a single process.
    """

    def __init__(self, fabric: L.Fabric | None = None) -> None:
        self.fabric = fabric

    @classmethod
    def start(cls, accelerator: str, devices: int, num_nodes: int) -> World:
        """Start (or join) the study's processes: ``devices × num_nodes`` ranks, one per device.

        On one machine, Lightning's launcher runs the same command again for ranks 1…devices−1 (they walk
        the study from its start to here, then join). Under ``torchrun`` or ``srun`` every rank is already
        running and Lightning reads its rank from the environment.
        """
        if devices * num_nodes == 1:
            return cls(None)
        fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
        fabric.launch()
        return cls(fabric)

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def size(self) -> int:
        """Number of processes."""
        return 1 if self.fabric is None else self.fabric.world_size

    @property
    def is_zero(self) -> bool:
        """Whether this is global rank zero (the one that decides and writes)."""
        return self.rank == 0

    def on_zero(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank zero and return its result on every rank; its error is raised on every rank."""
        if self.fabric is None:
            return work()
        return on_rank_zero(self.fabric.strategy, work)  # type: ignore[arg-type]  # Fabric's strategy quacks alike

    def gather(self, work: Callable[[], T]) -> list[T]:
        """Run ``work`` on every rank; every rank gets all results in rank order (any rank's error: every rank's)."""
        if self.fabric is None:
            return [work()]
        return gather_outcomes(self.fabric.strategy, work)  # type: ignore[arg-type]

    def stop_others(self) -> None:
        """End the ranks Lightning's launcher started from this process (rank zero failing outside a collective).

        A rank that fails inside one of Lightning's loops cannot tell the others, which may wait in a
        collective: as the Trainer does for its own processes, the launching rank kills them. Ranks started
        by torchrun or srun are ended by them (``srun --kill-on-bad-exit=1``).
        """
        launcher = self.fabric.strategy.launcher if self.fabric is not None else None
        for process in getattr(launcher, "procs", []):
            if process.poll() is None:
                process.kill()

    @contextlib.contextmanager
    def lock(self, path: Path, what: str, say: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the inter-process file lock ``path`` (on rank zero) while every rank runs the body.

        Another job holding it (the same fit or result, started twice) makes this job wait; the ranks
        exchange a heartbeat every :data:`LOCK_POLL_SECONDS`, so no collective times out while they wait.
        The lock is released when the body ends, error or not (and by the OS if the process dies).

        Args:
            path: The lock file (its folder is created).
            what: What is being made, for the waiting message.
            say: Where to report the wait (default: the log).
        """
        lock = None
        if self.is_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(path))

        def attempt() -> bool:
            assert lock is not None
            try:
                lock.acquire(timeout=LOCK_POLL_SECONDS)
            except filelock.Timeout:
                return False
            return True

        told = False
        while not self.on_zero(attempt):
            if not told:
                (say or log.info)(f"waiting for another job that is making {what} (lock {path})")
                told = True
        try:
            yield
        finally:
            if lock is not None:
                lock.release()
