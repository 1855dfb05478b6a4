"""Run a piece of a test in a fresh process with a given CPU thread count: like with like for bit-identity checks.

A merge's last bits depend on the thread count its BLAS/LAPACK kernels run with (on some CPUs 1 and 2 threads
round differently, ~1e-6 relative). A test that compares the output of worker processes (DDP ranks, cluster
jobs, racing processes; all run with one thread) bit for bit with an expected value must compute that value
the same way: in a process of its own, started with the same thread count. :func:`in_fresh_process` does that,
whatever the test process's own thread count (the suite passes with ``OMP_NUM_THREADS=1`` and without it).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["REPOSITORY", "WORKER_THREADS", "in_fresh_process", "plain_merge", "run_script", "worker_environment"]

REPOSITORY = Path(__file__).resolve().parents[1]
"""The repository root: what worker processes put on ``PYTHONPATH`` to import ``lightning_score`` and ``tests``."""

WORKER_THREADS = 1
"""The thread count every worker process of the suite runs with (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)."""

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _child(function: Callable[..., Any], args: tuple[Any, ...], threads: int, output: str) -> None:
    torch.set_num_threads(threads)
    try:
        result = function(*args)
    except BaseException:
        Path(output + ".error").write_text(traceback.format_exc())
        raise
    torch.save(result, output)


def in_fresh_process(function: Callable[..., Any], *args: Any, threads: int = WORKER_THREADS,
                     timeout: float = 600) -> Any:  # fmt: skip
    """``function(*args)`` computed in a new (spawned) process that runs with ``threads`` CPU threads.

    Args:
        function: A module-level function (spawned processes import it by name).
        *args: Its arguments (picklable).
        threads: The process's thread count (set in the environment before torch starts, and by torch).
        timeout: Seconds to wait for it.

    Returns:
        Its result: tensors, dicts, lists and plain values (read back with ``torch.load(weights_only=True)``).
    """
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        output = str(Path(folder) / "result.pt")
        saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
        os.environ.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
        try:
            process = context.Process(target=_child, args=(function, args, threads, output))
            process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        process.join(timeout)
        if process.is_alive():
            process.kill()
            raise TimeoutError(f"{function.__name__} did not finish in {timeout} s in its own process.")
        error = Path(output + ".error")
        if process.exitcode != 0:
            detail = error.read_text() if error.exists() else f"exit code {process.exitcode}"
            raise RuntimeError(f"{function.__name__} failed in its own process:\n{detail}")
        return torch.load(output, weights_only=True)


def plain_merge(paths: list[str], method: str) -> dict[str, torch.Tensor]:
    """One process's merge of task-vector files, with no cache and no sharding (to run with :func:`in_fresh_process`)."""
    from lightning_score.merging import merge_task_vectors
    from lightning_score.task_vector import TaskVector

    return dict(merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu"))


def worker_environment(**extra: str) -> dict[str, str]:
    """The environment of the suite's worker processes: offline, :data:`WORKER_THREADS` threads, this checkout."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(WORKER_THREADS),
            "PYTHONPATH": str(REPOSITORY), **extra}  # fmt: skip


def run_script(script: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in a worker process (:func:`worker_environment`); with ``check``, it must succeed."""
    result = subprocess.run([sys.executable, str(script), *args], env=worker_environment(), capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def slurm_environment(folder: Path, job_id: str, job_name: str) -> tuple[dict[str, str], Path]:
    """A worker environment as a one-task SLURM job sees it, with a fake ``scontrol`` first on ``PATH``.

    The fake records its arguments (one line per call) in the returned file and, as SLURM does on a requeue,
    stops the job with SIGTERM.
    """
    bin_dir, record = folder / "bin", folder / "scontrol.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {record}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    env = worker_environment(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=job_id, SLURM_NTASKS="1",
        SLURM_JOB_NAME=job_name, SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
    )  # fmt: skip
    return env, record
