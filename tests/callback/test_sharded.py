"""ScoreMergeCallback under FSDP1 (``FSDPStrategy``), FSDP2 and a tensor-parallel plan (``ModelParallelStrategy``).

The processes start through Lightning's own launcher (sharded_fit.py). FSDP2 is the real ``ModelParallelStrategy``;
FSDP1 runs through ``tests.sharding.CPUFSDPStrategy``, a TEST-ONLY subclass whose only change is to give FSDP the
CPU as its device (Lightning passes ``device_id=None`` on a CPU, which torch's FSDP refuses): the product code does
not depend on it. The tensor-parallel fit (``tp``) is the real ``ModelParallelStrategy(data_parallel_size=1,
tensor_parallel_size=2)`` with torch's ``parallelize_module`` plan in ``configure_model``. The compiled fits compile
after sharding with inductor, the default backend (measured: ~30 s of C++ compilation the first time on 2 loaded
CPU cores, a few seconds once its cache is warm). Tested on 2 CPU processes over gloo only, not on GPUs nor over
NCCL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.callback.snapshot import read_snapshot
from tests.processes import run_script

HERE = Path(__file__).resolve().parent
SHARDED = ("fsdp", "fsdp_flat", "fsdp2", "tp")
COMPILED = ("fsdp2_compiled", "fsdp2_wrapped", "fsdp_compiled")


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fits of sharded_fit.py (DDP, FSDP1 twice, FSDP2, TP, 3 compiled, 3 resumes), once for this file's tests."""
    out = tmp_path_factory.mktemp("sharded")
    run_script(HERE / "sharded_fit.py", "fits", str(out), timeout=600)
    return out


def _plain(tv: TaskVector) -> dict[str, torch.Tensor]:
    """Keys relative to the head, whether the fit snapshotted ``image_encoder`` or the whole module."""
    return {key.removeprefix("head."): tv[key] for key in tv}


@pytest.mark.ddp
@pytest.mark.parametrize("name", [*SHARDED, *COMPILED, "fsdp_resumed", "fsdp2_resumed", "tp_resumed"])
def test_the_task_vector_of_a_sharded_fit_is_the_ddp_fits(fits: Path, name: str) -> None:
    """Gathered at fit start (θ₀) and at train end (θ_T), τ is DDP's to 1e-6, under the unwrapped keys."""
    reference = _plain(TaskVector.load(fits / "ddp" / "ddp.safetensors"))
    tv = TaskVector.load(fits / name / f"{name}.safetensors")
    assert sorted(_plain(tv)) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]  # no _fsdp_wrapped_module., no _checkpoint
    for key, value in _plain(tv).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6)
        assert value.abs().sum() > 0
    finetuned = torch.load(fits / name / "finetuned.pt")  # gathered independently of the callback
    base = read_snapshot(next((fits / name / "pretrained").iterdir()), tv.base_fingerprint, verify=True)
    for key, value in tv.items():
        torch.testing.assert_close(value, finetuned[key.removeprefix("head.")] - base[key], rtol=0, atol=1e-6)
    assert len(list((fits / name / "pretrained").iterdir())) == 1  # θ₀ written once, by rank zero


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["fsdp_resumed", "fsdp2_resumed", "tp_resumed"])
def test_a_fit_resumed_from_a_sharded_checkpoint_keeps_its_theta0(fits: Path, name: str) -> None:
    checkpoint = fits / name / "checkpoints" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir()  # a sharded (distributed) checkpoint: a folder of shards
    tv = TaskVector.load(fits / name / f"{name}.safetensors")
    assert tv.metadata["global_step"] == 4
    reference = TaskVector.load(fits / "ddp" / "ddp.safetensors")
    assert tv.base_fingerprint == reference.base_fingerprint  # θ₀ of the start, not of the resume point


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["fsdp", "fsdp2", "tp"])
def test_the_merge_is_swapped_into_the_sharded_module_for_the_test_and_the_expert_comes_back(
    fits: Path, name: str
) -> None:
    merged = TaskVector.load(fits / name / "merged-average.safetensors")
    mine, other = (
        TaskVector.load(fits / name / f"{name}.safetensors"),
        TaskVector.load(fits / "ddp" / "ddp.safetensors"),
    )
    base = read_snapshot(next((fits / name / "pretrained").iterdir()), mine.base_fingerprint)
    during, after = torch.load(fits / name / "during_test.pt"), torch.load(fits / name / "after_test.pt")
    finetuned = torch.load(fits / name / "finetuned.pt")
    for key in merged:
        torch.testing.assert_close(merged[key], (mine[key] + other[key]) / 2)
        torch.testing.assert_close(during[key], base[key] + merged[key], rtol=0, atol=1e-6)
        assert not torch.equal(during[key], finetuned[key])
        assert torch.equal(after[key], finetuned[key])  # every rank's shard of the expert is back


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2", "tp"])
def test_an_error_on_rank_zero_under_sharding_stops_every_rank(kind: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_script(HERE / "sharded_fit.py", "error", kind, str(tmp_path), check=False, timeout=180)
    assert (
        result.returncode != 0 and time.perf_counter() - started < 120
    )  # (a loaded machine starts slowly) the process group's timeout is 30 min
    wanted = "mine.safetensors' holds the task vector of another fit"
    message = (tmp_path / "rank1.err").read_text()  # rank 1 learned rank zero's error, and stopped with it
    assert wanted in message, message
    assert wanted in result.stderr  # (rank zero itself may be ended by Lightning's process observer first)
    assert TaskVector.load(tmp_path / "mine.safetensors").metadata["name"] == "someone else"  # not replaced


@pytest.mark.ddp
def test_a_clip_expert_shards_itself_per_residual_block_and_its_task_vector_is_the_ddp_fits(
    quick_base: Path, tmp_path: Path
) -> None:
    """Only the strategy changes: CLIPExpert's configure_model (FSDP2) or wrap policy (FSDP1) shards each block."""
    from tests.experts import MODEL

    run_script(HERE / "sharded_fit.py", "expert", str(tmp_path), MODEL, str(quick_base), timeout=420)
    reference = TaskVector.load(tmp_path / "ddp" / "ddp.safetensors")
    assert any("in_proj_weight" in key for key in reference)  # the fused attention projection is gathered whole
    assert torch.load(tmp_path / "ddp" / "units.pt")["units"] == 0
    for kind in ("fsdp", "fsdp2"):
        units = torch.load(tmp_path / kind / "units.pt")
        assert units["units"] == units["blocks"] + (kind == "fsdp2")  # one per block (+ the encoder itself, FSDP2)
        tv = TaskVector.load(tmp_path / kind / f"{kind}.safetensors")
        assert sorted(tv) == sorted(reference) and tv.base_fingerprint == reference.base_fingerprint
        for key in reference:
            torch.testing.assert_close(tv[key], reference[key], rtol=0, atol=1e-6)


@pytest.mark.ddp
def test_testing_the_merge_in_flat_parameters_is_refused_on_every_rank_naming_use_orig_params(fits: Path) -> None:
    assert (fits / "flat_merge" / "merged-average.safetensors").exists()  # the merge itself is written
    for rank in (0, 1):
        message = (fits / "flat_merge" / f"test_refused-rank{rank}.txt").read_text()
        assert "use_orig_params=False" in message and "Use use_orig_params=True" in message, message


@pytest.mark.ddp
def test_a_tensor_parallel_fit_holds_its_head_as_dtensors_split_by_the_plan(fits: Path) -> None:
    """The plan did split the head: what the callback gathered is the whole of each weight, not one rank's part."""
    tv = TaskVector.load(fits / "tp" / "tp.safetensors")
    assert {key: tuple(tv[key].shape) for key in _plain(tv)} == {
        "0.weight": (6, 8),  # column-wise: each rank held 3 of the 6 rows
        "0.bias": (6,),
        "2.weight": (1, 6),  # row-wise: each rank held 3 of the 6 columns
        "2.bias": (1,),
    }
    assert tv.metadata["global_step"] == 4


@pytest.mark.ddp
@pytest.mark.parametrize("name", COMPILED)
def test_a_module_compiled_after_sharding_was_compiled_and_its_task_vector_has_plain_keys(
    fits: Path, name: str
) -> None:
    """Dynamo compiled the head (graphs counted from a reset cache); keys carry no ``_orig_mod.`` (τ: the test above)."""
    compiled = torch.load(fits / name / "compiled.pt")
    assert compiled["graphs"] >= 1
    wrapped = any("_orig_mod." in key for key in compiled["names"])  # the parameters' own names
    assert wrapped == (name == "fsdp2_wrapped"), compiled["names"]
    keys = list(TaskVector.load(fits / name / f"{name}.safetensors"))
    assert not any("_orig_mod" in key or "_fsdp" in key for key in keys), keys
