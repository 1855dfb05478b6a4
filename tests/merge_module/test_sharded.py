"""MergeModule under FSDP1 (``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy``): 2 CPU processes over gloo.

The processes start through Lightning's own launcher (sharded_merge.py). FSDP2 is the real ``ModelParallelStrategy``
(MergeModule's ``configure_model`` shards each residual block); FSDP1 runs through ``tests.sharding.CPUFSDPStrategy``,
a TEST-ONLY subclass whose only change is to give FSDP the CPU as its device (Lightning passes ``device_id=None`` on
a CPU, which torch's FSDP refuses): the product code does not depend on it. CPU processes over gloo only, not GPUs
nor NCCL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.processes import in_fresh_process, run_script

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def runs(quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The sharded runs of sharded_merge.py and the same merge and tests on one process."""
    from tests.experts import MODEL
    from tests.merge_module.sharded_merge import single_process

    out = tmp_path_factory.mktemp("sharded_merge")
    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    run_script(HERE / "sharded_merge.py", str(out), MODEL, str(quick_base), *paths, timeout=420)
    return out, in_fresh_process(single_process, MODEL, str(quick_base), paths)  # with the ranks' thread count


def _in_order(ranks: list[torch.Tensor], count: int) -> torch.Tensor:
    """Per-image rows of 2 ranks' shares (DistributedSampler without shuffling: rank r has images r, r+2, ...)."""
    rows = torch.empty(count, ranks[0].shape[1], dtype=ranks[0].dtype)
    for rank, share in enumerate(ranks):
        indices = torch.arange(rank, rank + 2 * len(share), 2) % count  # (padded to equal shares by repeating)
        rows[indices] = share
    return rows


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
def test_a_sharded_merge_module_tests_as_one_process_image_by_image(runs: tuple, kind: str) -> None:
    out, single = runs
    ranks = [torch.load(out / f"{kind}-rank{rank}.pt") for rank in (0, 1)]
    reference = single["first"]
    for rank in ranks:
        assert rank["sharded"]  # the image encoder was sharded while the test ran
        assert rank["alpha"] == reference["alpha"]  # the α search on the validation data split over ranks
        for key, value in reference["merged"].items():
            assert torch.equal(rank["merged"][key], value), key  # τ*: sharded by keys over ranks, as under DDP
    for key, value in reference["weights"].items():  # what the sharded image encoder held, gathered
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=0, atol=0)
    logits = _in_order([rank["logits"] for rank in ranks], len(reference["logits"]))
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(dim=1), reference["logits"].argmax(dim=1))  # the same prediction per image


@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
def test_use_alpha_loads_another_alpha_into_the_sharded_module(runs: tuple, kind: str) -> None:
    out, single = runs
    ranks = [torch.load(out / f"{kind}-alpha-rank{rank}.pt") for rank in (0, 1)]
    for key, value in single["alpha_weights"].items():  # every rank loaded its shard of θ₀ + 0.25·τ*
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=0, atol=0)
        assert not torch.equal(value, single["first"]["weights"][key]) or key.endswith("logit_scale"), key
    if kind == "fsdp2":  # and the test runs again with it
        logits = _in_order([rank["logits"] for rank in ranks], len(single["alpha"]))
        torch.testing.assert_close(logits, single["alpha"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(single["alpha"], single["first"]["logits"])  # another α: other logits
