"""DDP on CPU: 2 processes over gloo, through Lightning's own launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from tests.processes import in_fresh_process, plain_merge

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    result = subprocess.run(
        [sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.ddp
def test_two_process_fit_writes_exactly_one_valid_task_vector(tmp_path: Path) -> None:
    _run("ddp_fit.py", str(tmp_path))
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


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["score"])
def test_two_rank_sharded_merge_equals_the_single_process_merge(
    method: str, quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    import lightning.pytorch as pl

    from lightning_score import MergeModule
    from tests.lightning.conftest import MODEL, digits

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    _run("ddp_merge.py", str(tmp_path), MODEL, str(quick_base), method, *paths)
    single = in_fresh_process(plain_merge, paths, method)  # with the ranks' thread count: LAPACK rounds by it
    for rank in (0, 1):
        sharded = TaskVector.load(tmp_path / f"merged-rank{rank}.safetensors")
        assert sharded.metadata["merge"]["sharded_over_ranks"] == 2
        assert sorted(sharded) == sorted(single)
        for key in single:
            assert torch.equal(sharded[key], single[key]), key
    assert "test/rot30/acc" in torch.load(tmp_path / "results.pt")
    # α search: each rank evaluated about half of the validation images per α; the accuracies are the whole set's
    searches = [torch.load(tmp_path / f"search-rank{rank}.pt") for rank in (0, 1)]
    total = searches[0]["val_images"]
    assert searches[0]["images"] + searches[1]["images"] == 2 * total  # two α values, each image once
    assert abs(searches[0]["images"] - searches[1]["images"]) <= 2
    assert searches[0]["alpha_search"] == searches[1]["alpha_search"]  # every rank chose the same α
    module = MergeModule(MODEL, str(quick_base), task_vectors=paths, method=method, templates="digits", alpha="auto",
                         alpha_grid=[0.5, 1.0])  # fmt: skip
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=digits(train_domains=["rot0", "rot60"], test_domains=["rot30"]), verbose=False
    )
    assert searches[0]["alpha_search"]["val_acc"] == pytest.approx(module.alpha_search["val_acc"], abs=2 / total)


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_merges_sharing_a_factor_cache_on_two_ranks_equal_the_single_process_merge_without_it(
    strategy: str, quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    """Two folds through one FactorCache, each merge sharded over 2 gloo ranks: every rank's τ* equals the plain
    one-process merge of the same experts, bit for bit, under ddp and under ddp_spawn (where the cache travels
    pickled into the spawned processes)."""
    from tests.lightning.conftest import MODEL

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot30", "rot60")]
    _run("ddp_factors.py", str(tmp_path), strategy, MODEL, str(quick_base), *paths)
    for target, sources in (("rot60", ("rot0", "rot30")), ("rot30", ("rot0", "rot60"))):
        # with the ranks' thread count, in a process of its own: LAPACK's rounding depends on the thread count
        single = in_fresh_process(plain_merge, [str(expert_task_vectors[d]) for d in sources], "score")
        for rank in (0, 1):
            sharded = TaskVector.load(tmp_path / f"{target}-rank{rank}.safetensors")
            assert sharded.metadata["merge"]["sharded_over_ranks"] == 2
            assert sorted(sharded) == sorted(single)
            for key in single:
                assert torch.equal(sharded[key], single[key]), (strategy, target, rank, key)


@pytest.mark.ddp
def test_a_data_method_collects_and_merges_on_rank_zero_and_every_rank_gets_it(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    """Fisher merging under DDP: rank zero runs the gradient pass alone (no collective inside it) and broadcasts."""
    import lightning.pytorch as pl

    from lightning_score import MergeModule
    from tests.lightning.conftest import MODEL, digits

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    _run("ddp_merge.py", str(tmp_path), MODEL, str(quick_base), "fisher", *paths)
    ranks = [TaskVector.load(tmp_path / f"merged-rank{rank}.safetensors") for rank in (0, 1)]
    assert "sharded_over_ranks" not in ranks[0].metadata["merge"]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    module = MergeModule(MODEL, str(quick_base), task_vectors=paths, method="fisher", templates="digits")
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=digits(train_domains=["rot0", "rot60"], test_domains=["rot30"]), verbose=False
    )  # a tolerance, not bit-identity: this process's thread count may differ from the ranks'
    for key in module.merged:
        torch.testing.assert_close(ranks[0][key], module.merged[key], rtol=1e-5, atol=1e-7)


def _scenario(tmp_path: Path, *args: str, ok: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    result = subprocess.run([sys.executable, str(HERE / "ddp_scenarios.py"), args[0], str(tmp_path), *args[1:]],
                            env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


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
    from tests.lightning.conftest import MODEL

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    _scenario(tmp_path, "test_after_fit", MODEL, str(quick_base), *paths, timeout=90)
    merged = TaskVector.load(tmp_path / "merged.safetensors")
    assert "sharded_over_ranks" not in merged.metadata["merge"]  # one process merged everything
    single = in_fresh_process(plain_merge, paths, "score")  # with the scenario's thread count
    assert all(torch.equal(merged[k], single[k]) for k in single)
    assert "test/domain0/acc" in torch.load(tmp_path / "results.pt")
