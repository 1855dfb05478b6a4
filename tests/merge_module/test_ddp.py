"""MergeModule under DDP on CPU: 2 processes over gloo, through Lightning's own launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from tests.processes import in_fresh_process, plain_merge, run_script

HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["score"])
def test_two_rank_sharded_merge_equals_the_single_process_merge(
    method: str, quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    import lightning.pytorch as pl

    from lightning_score import MergeModule
    from tests.experts import MODEL, digits

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    run_script(HERE / "ddp_merge.py", str(tmp_path), MODEL, str(quick_base), method, *paths)
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
    assert searches[0]["alpha_search"]["val_acc"] == pytest.approx(
        module.alpha_search_result.to_dict()["val_acc"], abs=2 / total
    )


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_merges_sharing_a_factor_cache_on_two_ranks_equal_the_single_process_merge_without_it(
    strategy: str, quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    """Two folds through one FactorCache, each merge sharded over 2 gloo ranks: every rank's τ* equals the plain
    one-process merge of the same experts, bit for bit, under ddp and under ddp_spawn (where the cache travels
    pickled into the spawned processes)."""
    from tests.experts import MODEL

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot30", "rot60")]
    run_script(HERE / "ddp_factors.py", str(tmp_path), strategy, MODEL, str(quick_base), *paths)
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
    from tests.experts import MODEL, digits

    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    run_script(HERE / "ddp_merge.py", str(tmp_path), MODEL, str(quick_base), "fisher", *paths)
    ranks = [TaskVector.load(tmp_path / f"merged-rank{rank}.safetensors") for rank in (0, 1)]
    assert "sharded_over_ranks" not in ranks[0].metadata["merge"]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    module = MergeModule(MODEL, str(quick_base), task_vectors=paths, method="fisher", templates="digits")
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=digits(train_domains=["rot0", "rot60"], test_domains=["rot30"]), verbose=False
    )  # a tolerance, not bit-identity: this process's thread count may differ from the ranks'
    for key in module.merged:
        torch.testing.assert_close(ranks[0][key], module.merged[key], rtol=1e-5, atol=1e-7)


@pytest.mark.ddp
def test_every_rank_stops_with_the_same_error_when_a_check_fails(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path
) -> None:
    """No validation images, or an unwritable output: each rank raises the same error (none is left waiting at a
    collective), before the merge where it can be known then; a rank whose own share of the data is empty is fine."""
    import json

    from tests.experts import MODEL

    (tmp_path / "a-file").write_text("a regular file, where the output's folder should be")
    paths = [str(expert_task_vectors[d]) for d in ("rot0", "rot60")]
    run_script(HERE / "ddp_checks.py", str(tmp_path), MODEL, str(quick_base), *paths)
    ranks = {case: [json.loads((tmp_path / f"{case}-rank{r}.json").read_text()) for r in (0, 1)]
             for case in ("one", "empty", "stream", "output")}  # fmt: skip
    for case, (zero, one) in ranks.items():
        assert zero == one, case  # the same outcome on both ranks
    assert ranks["one"][0]["error"] is None and ranks["one"][0]["selected"] in (0.5, 1.0)
    empty, stream, output = ranks["empty"][0], ranks["stream"][0], ranks["output"][0]
    assert empty["error"].startswith("ValueError: alpha='auto' chooses α on the source domains' validation data, "
                                     "but it has no images for 'rot0'; 'rot60': every α would score 0.")  # fmt: skip
    assert not empty["merged"]  # refused before the merge
    assert stream["error"] == empty["error"] and stream["merged"]  # of unknown length: found by the first α pass
    assert output["error"] == (
        f"OutputNotWritableError: The merged weights file {tmp_path / 'a-file' / 'merged.safetensors'} is not "
        f"writable: {tmp_path / 'a-file'} is a file, not a folder; choose another location or fix its permissions"
    )
    assert not output["merged"]
