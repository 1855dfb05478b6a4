"""DDP on CPU: 2 processes over gloo, through Lightning's own launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector

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
    files = list((tmp_path / "task_vectors").iterdir())
    assert [f.name for f in files] == ["ddp.safetensors"]  # one file, no temporary left by another rank
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
    from lightning_score.merging import merge_task_vectors
    from tests.lightning.conftest import MODEL

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    _run("ddp_merge.py", str(tmp_path), MODEL, str(quick_base), method, *paths)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank does: LAPACK's rounding depends on the thread count
    try:
        single = merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu")
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        sharded = TaskVector.load(tmp_path / f"merged-rank{rank}.safetensors")
        assert sharded.metadata["merge"]["sharded_over_ranks"] == 2
        assert sorted(sharded) == sorted(single)
        for key in single:
            assert torch.equal(sharded[key], single[key]), key
    assert "test/rot30/acc" in torch.load(tmp_path / "results.pt")
