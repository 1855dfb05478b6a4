"""The study at cluster scale: two gloo processes through Lightning's launcher, SLURM array stages, locks, errors.

The reference is the one-command study in a process of its own with one thread (as each subprocess runs: the
merges' last bits depend on the thread count), whose per-image correctness every other way of running the same
study must reproduce exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import pytest
import torch
import yaml

from lightning_score import TaskVector
from lightning_score.study.distributed import World, batch_shard
from lightning_score.study.stages import ARRAY_ENV, Fit, planned_fits
from tests.experts import QUICK_BASE
from tests.processes import in_fresh_process
from tests.study.conftest import DOMAINS, QUICK_EXPERT

HERE = Path(__file__).resolve().parent
ROWS = [
    {"name": "SCORE"},
    {"name": "TSV-M", "method": "tsv"},
    {"name": "Zero-shot", "mode": "zeroshot"},
    {"name": "Pooled fine-tune (ERM)", "mode": "pooled"},
]
TARGETS = ["rot30", "rot60"]
EVAL_BATCH = 16  # 50 test images per target: batches of 16, 16, 16, 2; two ranks take two batches each


def _settings(root: Path, base: Path) -> dict:
    return dict(model_name=QUICK_BASE["model_name"], pretrained=str(base), templates="digits", root=str(root),
                targets=TARGETS, expert=dict(QUICK_EXPERT.__dict__), rows=ROWS, proxy_images=4, alpha_images=10,
                bootstrap=50, accelerator="cpu", eval_batch_size=EVAL_BATCH, seeds=[0])  # fmt: skip


def _cli(config: Path, output: Path, *args: str, env: dict | None = None, timeout: int = 240, script: str = "") -> (
    subprocess.CompletedProcess
):  # fmt: skip
    """``python -m lightning_score.cli study --config CONFIG --output_dir OUTPUT ARGS`` in a fresh process."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    environ.pop(ARRAY_ENV, None)
    entry = [script] if script else ["-m", "lightning_score.cli"]
    command = [sys.executable, *entry, "study", "--config", str(config), "--output_dir", str(output), *args]
    return subprocess.run(command, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _results(folder: Path) -> dict[str, dict]:
    """Every kept evaluation record of a study folder, by its path relative to results/."""
    return {str(p.relative_to(folder / "results")): json.loads(p.read_text())["record"]
            for p in sorted((folder / "results").rglob("*.json"))}  # fmt: skip


@pytest.fixture(scope="module")
def study_config(mini_digits: Path, quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster-config") / "study.yaml"
    path.write_text(yaml.safe_dump(_settings(mini_digits, quick_base)))
    return path


@pytest.fixture(scope="module")
def one_command(mini_digits: Path, quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-command study, on one thread in a process of its own (as every subprocess below runs)."""
    folder = tmp_path_factory.mktemp("one-command")
    in_fresh_process(_one_command, str(folder), _settings(mini_digits, quick_base))  # inherits the session's cache
    return folder


def _one_command(folder: str, settings: dict) -> None:
    """The study in a process of its own, with the workers' thread count (their merges' last bits depend on it)."""
    from lightning_score.study import ExpertSettings, Row, run_study

    settings.update(rows=[Row(**row) for row in ROWS], expert=ExpertSettings(**settings["expert"]))
    run_study(output_dir=folder, **settings)


# --- two processes through Lightning's launcher ---------------------------------------------------------------


@pytest.mark.ddp
def test_two_processes_give_the_one_process_table_for_the_same_experts(
    study_config: Path, one_command: Path, tmp_path: Path
) -> None:
    """Same experts, 2 gloo ranks (``--devices 2``): every merge's and zero-shot's per-image correctness is equal.

    The pooled models are left out of the copy, so this run fine-tunes them with DDP across the two ranks: a
    different optimisation path from the one-process fit (data split across ranks), checked for sanity.
    """
    shutil.copytree(one_command / "task_vectors", tmp_path / "task_vectors", ignore=shutil.ignore_patterns("pooled"))
    _ok(_cli(study_config, tmp_path, "--devices", "2"))

    one, two = _results(one_command), _results(tmp_path)
    assert sorted(one) == sorted(two) and len(one) == 2 * 6  # SCORE, TSV-M (+ α tuned), zero-shot, pooled per target
    for name, record in two.items():
        assert record["images_per_rank"] == [32, 18], name  # whole batches per rank, nothing padded or dropped
        assert record["num_images"] == one[name]["num_images"] == 50
        assert record["labels_digest"] == one[name]["labels_digest"]  # the test set's order is kept
        if "pooled" not in name:
            assert record["correct"] == one[name]["correct"], name  # every image's verdict, not just the accuracy
            assert (record["acc"], record["alpha"]) == (one[name]["acc"], one[name]["alpha"]), name
    assert all(r["images_per_rank"] == [50] for r in one.values())

    for target in TARGETS:  # DDP fits: the same settings recorded, a sane update close in direction to one process's
        ddp = TaskVector.load(tmp_path / f"task_vectors/seed-0/pooled/{target}.safetensors")
        single = TaskVector.load(one_command / f"task_vectors/seed-0/pooled/{target}.safetensors")
        assert ddp.metadata["expert_config"] == single.metadata["expert_config"]
        assert sorted(ddp) == sorted(single)
        a = torch.cat([ddp[k].flatten().double() for k in sorted(ddp)])
        b = torch.cat([single[k].flatten().double() for k in sorted(single)])
        assert torch.isfinite(a).all() and a.norm() > 0 and not torch.equal(a, b)
        assert 0.5 < a.norm() / b.norm() < 2.0
        assert torch.dot(a, b) / (a.norm() * b.norm()) > 0.25  # measured 0.50; unrelated directions: |cos| < 0.01
    written = sorted(p.name for p in tmp_path.iterdir())
    assert {"results.json", "results.md", "study.yaml", "study.log"} <= set(written)
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"
    log = (tmp_path / "study.log").read_text()
    assert log.count("rot0 (seed 0): reused") == 1  # one rank writes the log


@pytest.mark.ddp
def test_an_error_on_one_rank_stops_every_rank_with_the_error(study_config: Path, one_command: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    shutil.copytree(one_command / "task_vectors", tmp_path / "task_vectors")
    started = time.perf_counter()
    result = _cli(study_config, tmp_path, "--devices", "2", timeout=180,
                  script=str(HERE / "cluster_failing_rank.py"))  # fmt: skip
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert time.perf_counter() - started < 180
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))


def test_the_evaluate_stage_names_missing_experts_and_the_command(
    study_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any rank is launched (nothing to wait for): one line naming each missing file and the command."""
    from lightning_score.cli import main

    def launched(*args: object) -> None:
        raise AssertionError("the ranks were started before the missing experts were noticed")

    monkeypatch.setattr(World, "start", launched)
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(study_config), "--output_dir", str(tmp_path), "--stage", "evaluate",
              "--devices", "2"])  # fmt: skip
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("lightning-score: error: --stage evaluate fits nothing"), lines
    for domain in DOMAINS:
        assert str(tmp_path / f"task_vectors/seed-0/{domain}.safetensors") in lines[0]
    assert str(tmp_path / "task_vectors/seed-0/pooled/rot30.safetensors") in lines[0]
    assert "--stage experts --stage_domains '[rot0, rot30, rot60]'" in lines[0]
    assert not (tmp_path / "results").exists()


# --- cluster stages ------------------------------------------------------------------------------------------


@pytest.mark.ddp
def test_array_tasks_then_the_evaluate_stage_give_the_one_command_table(
    study_config: Path, one_command: Path, tmp_path: Path
) -> None:
    """One process per SLURM array task (one domain each, at once, sharing the folder), then ``--stage evaluate``."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    command = [sys.executable, "-m", "lightning_score.cli", "study", "--config", str(study_config), "--output_dir",
               str(tmp_path), "--stage", "experts"]  # fmt: skip
    tasks = [subprocess.Popen(command, env={**environ, ARRAY_ENV: str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(len(DOMAINS))]  # fmt: skip
    for task in tasks:
        output, _ = task.communicate(timeout=240)
        assert task.returncode == 0, output[-3000:]
    folder = tmp_path / "task_vectors"
    made = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if "pretrained" not in p.parts)
    assert made == ["seed-0/pooled/rot30.safetensors", "seed-0/pooled/rot60.safetensors",
                    "seed-0/rot0.safetensors", "seed-0/rot30.safetensors", "seed-0/rot60.safetensors"]  # fmt: skip
    assert not (tmp_path / "results").exists()  # the experts stage evaluates nothing

    _ok(_cli(study_config, tmp_path, "--stage", "evaluate"))
    one, staged = _results(one_command), _results(tmp_path)
    assert sorted(one) == sorted(staged)
    for name in one:
        assert staged[name]["correct"] == one[name]["correct"], name
        assert (staged[name]["acc"], staged[name]["alpha"]) == (one[name]["acc"], one[name]["alpha"]), name
    assert json.loads((tmp_path / "results.json").read_text())["targets"] == TARGETS


def test_each_expert_is_factorized_once_per_seed_for_every_row_and_target(one_command: Path) -> None:
    """SCORE and TSV-M on two targets merge 2 of the 3 experts 4 times; each expert's SVDs are computed once."""
    import re

    tv = TaskVector.load(one_command / "task_vectors/seed-0/rot0.safetensors")
    matrices = sum(1 for key in tv if tv[key].ndim == 2)
    line = next(x for x in (one_command / "study.log").read_text().splitlines() if "SVDs" in x)
    computed, reused = map(int, re.search(r"computed (\d+) times and reused (\d+) times", line).groups())
    assert computed == len(DOMAINS) * matrices  # without the shared cache: 2 targets x 2 rows x 2 experts each
    assert reused >= matrices  # at least once per key (measured: 4 per key; the rest is reused derived bases)


# --- the pieces, in this process ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "batch", "world"), [(50, 16, 2), (50, 16, 3), (50, 16, 8), (64, 16, 4), (1, 4, 2),
                                                       (0, 4, 2), (257, 32, 5)])  # fmt: skip
def test_batch_shards_are_whole_batches_covering_every_image_once_in_order(count: int, batch: int, world: int) -> None:
    shards = [batch_shard(count, batch, rank, world) for rank in range(world)]
    assert [i for shard in shards for i in shard] == list(range(count))  # disjoint, complete, in order
    batches = [range(start, min(start + batch, count)) for start in range(0, count, batch)]
    for shard in shards:  # each shard is a run of the single process's own batches
        inside = [b for b in batches if b.start in shard]
        assert [i for b in inside for i in b] == list(shard)
    sizes = [len([b for b in batches if b.start in shard]) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="batch_shard"):
        batch_shard(count, batch, world, world)


def test_array_tasks_index_seed_major_pairs_and_out_of_range_is_one_error() -> None:
    seeds, domains, targets = [0, 1], ["a", "b", "c"], ["b", "c"]
    plan = [planned_fits("experts", seeds, domains, targets, True, None, {ARRAY_ENV: str(i)}) for i in range(6)]
    assert plan[0] == [Fit("expert", 0, "a")]  # "a" is no target: no pooled model of its fold
    assert plan[1] == [Fit("expert", 0, "b"), Fit("pooled", 0, "b")]
    assert plan[5] == [Fit("expert", 1, "c"), Fit("pooled", 1, "c")]
    everything = planned_fits("all", seeds, domains, targets, True, None, {ARRAY_ENV: "3"})  # ignored outside experts
    assert sorted(everything, key=repr) == sorted([f for p in plan for f in p], key=repr) and len(everything) == 10
    assert planned_fits("experts", seeds, domains, targets, False, ["c"], {ARRAY_ENV: "0"}) == [
        Fit("expert", 0, "c"), Fit("expert", 1, "c")]  # fmt: skip  # a domain list wins over the array index
    with pytest.raises(ValueError, match=r"SLURM_ARRAY_TASK_ID=6, .* 6 \(seed, domain\) .* --array=0-5"):
        planned_fits("experts", seeds, domains, targets, True, None, {ARRAY_ENV: "6"})
    with pytest.raises(ValueError, match="stage_domains applies to --stage experts only"):
        planned_fits("evaluate", seeds, domains, targets, True, ["a"], {})
    with pytest.raises(ValueError, match=r"stage_domains \['z'\] must be .* \['a', 'b', 'c'\]"):
        planned_fits("experts", seeds, domains, targets, True, ["z"], {})
    with pytest.raises(ValueError, match="stage='fit'"):
        planned_fits("fit", seeds, domains, targets, True, None, {})


def test_a_lock_held_by_another_job_makes_the_study_wait_then_go_on(tmp_path: Path, monkeypatch) -> None:
    import lightning_score.study.distributed as distributed

    monkeypatch.setattr(distributed, "LOCK_POLL_SECONDS", 0.05)
    path = tmp_path / ".locks" / "rot0.lock"
    path.parent.mkdir()
    other = filelock.FileLock(str(path))
    other.acquire()  # another job making the same file (a thread stands in for it: fcntl locks are per open file)
    said: list[str] = []
    inside = threading.Event()

    def job() -> None:
        with World().lock(path, "rot0.safetensors", said.append):
            inside.set()

    thread = threading.Thread(target=job)
    thread.start()
    time.sleep(0.5)
    assert not inside.is_set() and said == [f"waiting for another job that is making rot0.safetensors (lock {path})"]
    other.release()
    thread.join(timeout=10)
    assert inside.is_set() and len(said) == 1


def test_the_slurm_script_submits_the_expert_array_then_the_evaluation_after_it(tmp_path: Path) -> None:
    """recipes/multi_gpu/slurm_study.sbatch with stand-ins for sbatch and srun that record their arguments."""
    script = HERE.parents[1] / "recipes/multi_gpu/slurm_study.sbatch"
    calls = tmp_path / "calls.txt"
    for tool, answer in (("sbatch", 'echo "$((1000 + $(wc -l < CALLS)));cluster"'), ("srun", "true")):
        stand_in = tmp_path / tool
        stand_in.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> CALLS\n{answer}\n'.replace("CALLS", str(calls)))
        stand_in.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ["PATH"] = f"{tmp_path}:{environ['PATH']}"
    run = dict(capture_output=True, text=True, timeout=30)
    submit = subprocess.run(["bash", str(script), "study.yaml", "6", "--root", "/data/PACS"], env=environ, **run)
    assert submit.returncode == 0, submit.stderr
    assert "array job 1001 (6 tasks) and evaluation job 1002" in submit.stdout
    job = subprocess.run(["bash", str(script), "experts", "study.yaml", "--root", "/data/PACS"], **run,
                         env={**environ, "SLURM_JOB_ID": "1001", ARRAY_ENV: "4", "EXPERTS_ARGS": "--seeds [0]"})  # fmt: skip
    assert job.returncode == 0, job.stderr
    assert calls.read_text().splitlines() == [
        f"sbatch --parsable --array=0-5 {script} experts study.yaml --root /data/PACS",
        f"sbatch --parsable --dependency=afterok:1001 {script} evaluate study.yaml --root /data/PACS",
        "srun --kill-on-bad-exit=1 lightning-score study --config study.yaml --stage experts --root /data/PACS --seeds [0]",
    ]
    wrong = subprocess.run(["bash", str(script), "study.yaml", "six"], env=environ, **run)
    assert wrong.returncode == 2 and "NUM_EXPERTS must be a positive integer" in wrong.stderr
    submitted = subprocess.run(["bash", str(script), "study.yaml", "4"], env={**environ, "SLURM_JOB_ID": "7"}, **run)
    assert submitted.returncode == 2 and "run this script with bash on the login node" in submitted.stderr
    assert len(calls.read_text().splitlines()) == 3  # neither wrong call reached sbatch or srun
