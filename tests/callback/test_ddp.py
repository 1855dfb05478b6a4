"""The callback under DDP on CPU: 2 processes over gloo, through Lightning's own launcher."""

from __future__ import annotations

import time
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch

from lightning_score import TaskVector
from tests.processes import in_fresh_process, plain_merge, run_script

HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
def test_two_process_fit_writes_exactly_one_valid_task_vector(tmp_path: Path) -> None:
    run_script(HERE / "ddp_fit.py", str(tmp_path))
    files = sorted((tmp_path / "task_vectors").iterdir())
    assert [f.name for f in files] == ["ddp.safetensors", "pretrained"]  # one file, no temporary left by another rank
    assert len(list((tmp_path / "task_vectors" / "pretrained").iterdir())) == 1  # θ₀, written once
    tv = TaskVector.load(files[0])
    pre = torch.load(tmp_path / "pretrained.pt")
    fine = torch.load(tmp_path / "finetuned.pt")
    assert sorted(tv) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    for key in tv:
        torch.testing.assert_close(tv[key], fine[key] - pre[key], rtol=0, atol=0)
        assert tv[key].abs().sum() > 0
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def _scenario(tmp_path: Path, scenario: str, *args: str, ok: bool = True, timeout: int = 120) -> CompletedProcess:
    return run_script(HERE / "ddp_scenarios.py", scenario, str(tmp_path), *args, check=ok, timeout=timeout)


@pytest.mark.ddp
def test_ddp_spawn_tests_the_merge_in_the_main_process(tmp_path: Path) -> None:
    """The fit runs in spawned workers: the main process still finds the files and tests the merge, not the expert."""
    _scenario(tmp_path, "spawn_merge")
    main = torch.load(tmp_path / "main_process.pt")
    assert main["task_vector"] == str(tmp_path / "b.safetensors")
    assert main["merged"] == str(tmp_path / "merged-average.safetensors")
    merged, pretrained = TaskVector.load(main["merged"]), torch.load(tmp_path / "pretrained.pt")
    a, b = TaskVector.load(tmp_path / "a.safetensors"), TaskVector.load(tmp_path / "b.safetensors")
    seen = torch.load(tmp_path / "seen_during_test.pt")
    for key in merged:
        torch.testing.assert_close(merged[key], (a[key] + b[key]) / 2)
        torch.testing.assert_close(seen[key], pretrained[key] + merged[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(b[key], main["expert"][key] - pretrained[key], rtol=0, atol=1e-6)
    after = torch.load(tmp_path / "after_test.pt")
    assert all(torch.equal(after[k], main["expert"][k]) for k in after)  # the main process's module is the expert


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_an_error_found_on_rank_zero_stops_every_rank_at_once(strategy: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = _scenario(tmp_path, "rank_zero_error", strategy, ok=False, timeout=90)  # process group timeout: 30 min
    assert result.returncode != 0 and time.perf_counter() - started < 60
    wanted = "foreign.safetensors' was made from different pre-trained weights"
    for rank in (0, 1):
        if strategy == "ddp_spawn" and rank == 1 and not (tmp_path / "rank1.err").exists():
            continue  # torch.multiprocessing ends the other workers as soon as one fails: no hang either way
        message = (tmp_path / f"rank{rank}.err").read_text()
        assert wanted in message, (rank, message)
    assert wanted in result.stderr
    assert not (tmp_path / "Regressor.safetensors").exists()


@pytest.mark.ddp
def test_a_single_device_test_after_a_ddp_fit_merges_alone(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    from tests.experts import MODEL

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    _scenario(tmp_path, "test_after_fit", MODEL, str(quick_base), *paths, timeout=90)
    merged = TaskVector.load(tmp_path / "merged.safetensors")
    assert "sharded_over_ranks" not in merged.metadata["merge"]  # one process merged everything
    single = in_fresh_process(plain_merge, paths, "score")  # with the scenario's thread count
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert "test/domain0/acc" in torch.load(tmp_path / "results.pt")
