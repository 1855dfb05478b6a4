"""A fit stopped by a signal exits non-zero, says in one line what is unfinished, and writes no task vector.

Real processes get real signals: the ``lightning-score fit`` command runs in a subprocess, the test waits for a
marker file (written by a test-only callback once training has started) and sends SIGTERM or SIGINT. Under SLURM
(simulated: its environment variables, and a fake ``scontrol`` on PATH that records its arguments and stops the job
with SIGTERM, as SLURM does on a requeue) Lightning's own requeue on SIGUSR1 still saves its checkpoint and
requeues, and the rerun resumes from that checkpoint and writes the task vector.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_score import TaskVector
from lightning_score.utilities.signals import StoppedBySignal, watch_signals
from tests.experts import MODEL
from tests.processes import slurm_environment, worker_environment

MAX_STEPS = 30
FIT_LINE = "lightning-score fit: stopped by {} before training finished, so no task vector was written"


def _fit_command(base: Path, marker: Path) -> list[str]:
    return [
        sys.executable, "-m", "lightning_score.cli", "fit", f"--model.model_name={MODEL}", f"--model.pretrained={base}",
        "--model.templates=digits", "--model.lr=1e-3", "--model.warmup_steps=1", "--data.root=builtin:digits",
        "--data.train_domains=[rot0]", "--data.batch_size=16", "--data.num_workers=0", "--trainer.accelerator=cpu",
        f"--trainer.max_steps={MAX_STEPS}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.default_root_dir=run",
        "--trainer.callbacks+=lightning_score.ScoreMergeCallback", "--trainer.callbacks.dirpath=run/task_vectors",
        "--trainer.callbacks+=tests.utilities.signal_marker.Started", f"--trainer.callbacks.path={marker}",
    ]  # fmt: skip


def run_until_marker(
    command: list[str], cwd: Path, marker: Path, signum: int, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """Start ``command``, send ``signum`` once ``marker`` exists, and return the finished process's output."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert process.poll() is None, f"ended before the marker: {process.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no marker in time"
            time.sleep(0.2)
        os.kill(process.pid, signum)
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _task_vectors(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.safetensors") if "pretrained" not in p.parts]


def test_a_fit_stopped_by_sigterm_exits_non_zero_with_one_line_and_no_task_vector(
    quick_base: Path, tmp_path: Path
) -> None:
    """(SIGINT takes the same path; tests/study/test_signals.py sends it to a study.)"""
    signum = signal.SIGTERM
    marker = tmp_path / "started"
    result = run_until_marker(_fit_command(quick_base, marker), tmp_path, marker, signum, worker_environment())
    assert result.returncode == 128 + signum, result.stderr[-3000:]  # Lightning alone: 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("lightning-score fit: stopped by")]
    assert len(lines) == 1 and lines[0].startswith(FIT_LINE.format(signum.name)), result.stderr[-3000:]
    assert "rerun the same command" in lines[0]
    assert _task_vectors(tmp_path) == []  # nothing of the half-trained expert
    assert "Traceback" not in result.stderr


def test_slurm_requeue_on_sigusr1_saves_its_checkpoint_requeues_and_the_rerun_resumes(
    quick_base: Path, tmp_path: Path
) -> None:
    """Lightning's SLURMEnvironment(auto_requeue=True) with the callback: checkpoint, requeue, no τ; then resume."""
    env, record = slurm_environment(tmp_path, "4242", "score-expert")
    marker = tmp_path / "started"
    command = _fit_command(quick_base, marker)
    result = run_until_marker(command, tmp_path, marker, signal.SIGUSR1, env)
    assert record.read_text().split() == ["requeue", "4242"], result.stderr[-3000:]
    assert (tmp_path / "run" / "hpc_ckpt_1.ckpt").is_file()
    assert result.returncode == 128 + signal.SIGTERM and FIT_LINE.format("SIGTERM") in result.stderr
    assert _task_vectors(tmp_path) == []

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in rerun.stderr + rerun.stdout  # Lightning restored the requeue checkpoint
    (path,) = _task_vectors(tmp_path)
    assert TaskVector.load(path).metadata["global_step"] == MAX_STEPS


def test_watch_signals_records_the_signal_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with watch_signals() as watch, pytest.raises(SystemExit) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs in the main thread at once
    assert watch.stopped(stopped.value) and watch.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert StoppedBySignal(signal.SIGTERM, "x").code == 143
