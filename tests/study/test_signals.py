"""A study stopped by a signal, and its output when it is not a terminal (real processes, real signals).

The study command runs in a subprocess with its output going to files (not a terminal), so it writes progress
lines instead of a bar: the test waits for the first line of a fit's steps (training has started), then sends the
signal. Under SLURM (simulated: its environment variables and a fake ``scontrol`` that records its arguments and
stops the job with SIGTERM, as a requeue does), SIGUSR1 makes Lightning save the fit's checkpoint and requeue; the
rerun resumes that fit from it and finishes the study.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_score import TaskVector
from tests.experts import MODEL
from tests.processes import slurm_environment, worker_environment

STEPS = 120
FIRST_LINE = f"fine-tuning rot0 (seed 0): step {STEPS // 10}/{STEPS} (10 %)"


def _study(base: Path, root: Path, out: Path) -> list[str]:
    expert = f'{{"lr": 0.001, "warmup_steps": 1, "max_steps": {STEPS}, "max_epochs": null, "batch_size": 32}}'
    return [
        sys.executable, "-m", "lightning_score.cli", "study", f"--output_dir={out}", f"--model_name={MODEL}",
        f"--pretrained={base}", "--templates=digits", f"--root={root}", "--domains=[rot0, rot30]",
        "--targets=[rot30]", '--rows=[{"name": "Zero-shot", "mode": "zeroshot"}]', f"--expert={expert}",
        "--seeds=[0]", "--alpha_tuning=false", "--bootstrap=50", "--eval_batch_size=64", "--accelerator=cpu",
    ]  # fmt: skip


def _run(command: list[str], folder: Path, env: dict[str, str], signum: int | None = None) -> tuple[int, str, str]:
    """Run with stdout/stderr to files; with ``signum``, send it once the first fit's first step line is out."""
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while signum is not None and FIRST_LINE not in stdout.read_text():
                assert process.poll() is None, stderr.read_text()[-3000:]
                assert time.monotonic() < deadline, "no progress line in time"
                time.sleep(0.1)
            if signum is not None:
                os.kill(process.pid, signum)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, stdout.read_text(), stderr.read_text()


def _experts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "task_vectors" / "seed-0").glob("*.safetensors"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_study_stopped_by_a_signal_exits_non_zero_says_where_and_keeps_nothing_partial(
    signum: signal.Signals, mini_digits: Path, quick_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    code, _, stderr = _run(_study(quick_base, mini_digits, out), tmp_path, worker_environment(), signum)
    assert code == 128 + signum, stderr[-3000:]  # Lightning alone: 0 for SIGTERM, 1 (and no word) for SIGINT
    expected = (f"lightning-score study: stopped by {signum.name} at 'fine-tuning rot0 (seed 0)' (0 of 3 steps done). "
                f"Every finished fit and result is kept in {out} and nothing partial was written: rerun the same "
                "command to resume from there.")  # fmt: skip
    assert [line for line in stderr.splitlines() if "stopped by" in line] == [expected]
    assert expected in (out / "study.log").read_text()
    assert _experts(out) == []  # no task vector of the half-trained expert
    assert "Traceback" not in stderr


def test_slurm_requeue_on_sigusr1_checkpoints_the_fit_requeues_and_the_rerun_resumes_it(
    mini_digits: Path, quick_base: Path, tmp_path: Path
) -> None:
    env, record = slurm_environment(tmp_path, "777", "score-study")
    out, command = tmp_path / "study", _study(quick_base, mini_digits, tmp_path / "study")
    code, _, stderr = _run(command, tmp_path, env, signal.SIGUSR1)
    assert record.read_text().split() == ["requeue", "777"], stderr[-3000:]
    checkpoint = out / "logs" / "seed-0" / "fits" / "rot0" / "hpc_ckpt_1.ckpt"  # the fit's own folder
    assert checkpoint.is_file() and code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at 'fine-tuning rot0 (seed 0)'" in stderr and _experts(out) == []

    code, stdout, stderr = _run(command, tmp_path, env)  # the requeued job
    assert code == 0, stderr[-3000:]
    # not on a terminal: a line every 10 % of a fit's steps and every 5 % of the study, with elapsed and estimate
    steps = re.findall(r"^fine-tuning rot30 \(seed 0\): step (\d+)/120 \(\d+ %\), elapsed \d+:\d\d(, ~\d+:\d\d left)?$",
                       stdout, re.MULTILINE)  # fmt: skip
    assert [int(s) for s, _ in steps] == list(range(12, 121, 12)) and all(left for _, left in steps[:-1])
    assert re.search(r"^study: step 2/3 \(67 %\), elapsed \d+:\d\d, ~\d+:\d\d left$", stdout, re.MULTILINE)
    assert "━" not in stdout  # no progress bar drawn into the file
    assert "fine-tuning rot30 (seed 0): step 60/120 (50 %)" in (out / "study.log").read_text()
    first = re.search(r"^fine-tuning rot0 \(seed 0\): step (\d+)/", stdout, re.MULTILINE)
    assert first is not None and int(first.group(1)) > STEPS // 10  # resumed from the checkpoint, not from step 0
    assert _experts(out) == ["rot0.safetensors", "rot30.safetensors"]
    assert TaskVector.load(out / "task_vectors/seed-0/rot0.safetensors").metadata["global_step"] == STEPS
    assert not checkpoint.exists() and (out / "results.md").is_file()  # the finished fit's checkpoint is removed
