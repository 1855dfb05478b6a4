"""The merge engine: key routing, α, dtypes, lazy inputs, streaming, metadata and every bad input."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.merging import get_method, is_matrix_key, list_methods, merge_task_vectors
from lightning_score.merging.methods.score import score_merge


def _model(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 3, 2, 2, generator=g).to(dtype),
        "positional_embedding": torch.randn(5, 8, generator=g).to(dtype),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g).to(dtype),
        "transformer.resblocks.0.attn.in_proj_bias": torch.randn(24, generator=g).to(dtype),
        "transformer.resblocks.0.mlp.c_proj.weight": torch.randn(8, 32, generator=g).to(dtype),
        "text_projection": torch.randn(8, 6, generator=g).to(dtype),
        "proj": torch.randn(8, 6, generator=g).to(dtype),
    }


def test_matrix_keys_go_to_the_method_and_the_rest_to_the_mean() -> None:
    tvs = [_model(s, torch.float64) for s in range(3)]
    merged = merge_task_vectors(tvs, "score", device="cpu")
    for key in tvs[0]:
        stacked = torch.stack([tv[key] for tv in tvs])
        expected = score_merge(stacked) if is_matrix_key(key, tuple(stacked.shape[1:])) else stacked.mean(0)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-12, msg=key)
    assert not torch.allclose(merged["proj"], torch.stack([tv["proj"] for tv in tvs]).mean(0))
    torch.testing.assert_close(merged["text_projection"], torch.stack([tv["text_projection"] for tv in tvs]).mean(0))


def test_alpha_scales_everything_and_metadata_records_the_merge() -> None:
    tvs = [
        TaskVector(_model(s), {"name": f"d{s}", "domain": f"d{s}", "base_fingerprint": "blake2b:ab"}) for s in range(2)
    ]
    one = merge_task_vectors(tvs, device="cpu", variant="diagonal")
    half = merge_task_vectors(tvs, alpha=0.5, device="cpu", variant="diagonal")
    for key in one:
        torch.testing.assert_close(half[key], 0.5 * one[key])
    meta = half.metadata
    assert meta["merge"]["method"] == "score" and meta["merge"]["alpha"] == 0.5
    assert meta["merge"]["options"] == {
        "variant": "diagonal",
        "z": 1.96,
        "divide_by_tasks": True,
        "sign_convention": "svd",
    }
    assert [i["name"] for i in meta["merge"]["inputs"]] == ["d0", "d1"]
    assert half.base_fingerprint == "blake2b:ab"


def test_a_single_task_vector_merges() -> None:
    tv = _model(0, torch.float64)
    merged = merge_task_vectors([tv], device="cpu", variant="full")
    for key in tv:
        torch.testing.assert_close(merged[key], tv[key], rtol=0, atol=1e-10)


def test_lazy_merge_from_disk_is_bit_identical_to_in_memory(tmp_path: Path) -> None:
    tvs = [TaskVector(_model(s), {"name": f"t{s}"}) for s in range(3)]
    paths = [tv.save(tmp_path / f"t{i}.safetensors") for i, tv in enumerate(tvs)]
    in_memory = merge_task_vectors(tvs, device="cpu")
    lazy = merge_task_vectors([TaskVector.load(p) for p in paths], device="cpu")
    assert sorted(in_memory) == sorted(lazy)
    for key in in_memory:
        assert torch.equal(in_memory[key], lazy[key]), key
    assert [i["path"] for i in lazy.metadata["merge"]["inputs"]] == [str(p) for p in paths]


class _Tracking(Mapping[str, torch.Tensor]):
    """A task vector that records which of the tensors it handed out are still alive."""

    def __init__(self, tensors: dict[str, torch.Tensor], alive: dict[str, list[weakref.ref]]) -> None:
        self._tensors = tensors
        self._alive = alive

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key].clone()
        self._alive.setdefault(key, []).append(weakref.ref(tensor))
        live_keys = {k for k, refs in self._alive.items() if any(r() is not None for r in refs) and k != key}
        assert not live_keys, f"asked for {key} while slices of {live_keys} are still held"
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@pytest.mark.parametrize("method", [m for m in list_methods() if not get_method(m).needs_data])
def test_the_engine_holds_one_key_at_a_time(method: str) -> None:
    alive: dict[str, list[weakref.ref]] = {}
    tvs = [_Tracking(_model(s), alive) for s in range(3)]
    merged = merge_task_vectors(tvs, method, device="cpu")
    assert len(merged) == len(_model(0))


def test_progress_bar_does_not_change_the_result() -> None:
    tvs = [_model(s) for s in range(2)]
    a = merge_task_vectors(tvs, device="cpu", progress=True)
    b = merge_task_vectors(tvs, device="cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad input: one clear ValueError each, naming what is wrong and the fix -------------------------


def test_empty_list() -> None:
    with pytest.raises(ValueError, match="empty list of task vectors"):
        merge_task_vectors([])


def test_a_single_mapping_instead_of_a_list() -> None:
    with pytest.raises(ValueError, match="sequence of task vectors.*Wrap a single task vector in a list"):
        merge_task_vectors(_model(0))  # type: ignore[arg-type]


def test_different_key_sets() -> None:
    a, b = _model(0), _model(1)
    del b["proj"]
    with pytest.raises(ValueError, match=r"different keys: task 1 .* lacks 1 key\(s\).*'proj'"):
        merge_task_vectors([a, b])


def test_shape_mismatch_names_the_key() -> None:
    a, b = _model(0), _model(1)
    b["proj"] = torch.zeros(6, 8)
    with pytest.raises(ValueError, match=r"Key 'proj' has shape \(8, 6\) in task 0 .* but \(6, 8\) in task 1"):
        merge_task_vectors([a, b])


def test_dtype_mismatch_names_the_key() -> None:
    a, b = _model(0), _model(1)
    b["proj"] = b["proj"].double()
    with pytest.raises(ValueError, match="Key 'proj' has dtype torch.float32 .* but torch.float64"):
        merge_task_vectors([a, b])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_key_and_task(bad: float, tmp_path: Path) -> None:
    tvs = [TaskVector(_model(s), {"name": f"d{s}"}) for s in range(3)]
    broken = _model(2)
    broken["transformer.resblocks.0.mlp.c_proj.weight"][1, 2] = bad
    path = TaskVector(broken, {"name": "d2"}).save(tmp_path / "d2.safetensors")
    with pytest.raises(
        ValueError, match=r"'transformer.resblocks.0.mlp.c_proj.weight' of task 2 \(.*d2.safetensors'\) has non-finite"
    ):
        merge_task_vectors([tvs[0], tvs[1], TaskVector.load(path)], device="cpu")


def test_different_base_fingerprints_say_which_files(tmp_path: Path) -> None:
    paths = []
    for s, fp in enumerate(["blake2b:aaaa", "blake2b:aaaa", "blake2b:bbbb"]):
        paths.append(TaskVector(_model(s), {"base_fingerprint": fp}).save(tmp_path / f"e{s}.safetensors"))
    with pytest.raises(
        ValueError, match=r"different pre-trained weights.*e0.safetensors.*e1.safetensors.*blake2b:bbbb.*e2"
    ):
        merge_task_vectors([TaskVector.load(p) for p in paths])


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown merge method 'scor'\. Registered methods: .*score"):
        merge_task_vectors([_model(0)], "scor")
    assert "score" in list_methods()


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"Unknown option\(s\) \['zeta'\] for merge method 'score'. Valid options: variant='trimmed', z=1.96",
    ):
        merge_task_vectors([_model(0)], zeta=2.0)


def test_bad_option_values() -> None:
    with pytest.raises(
        ValueError,
        match=r"variant='trim' is not valid .* choose one of \['trimmed', 'diagonal', 'off_diagonal', 'full'\]",
    ):
        merge_task_vectors([_model(0)], variant="trim")
    with pytest.raises(ValueError, match="z='2' of merge method 'score' must be a finite number"):
        merge_task_vectors([_model(0)], z="2")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        merge_task_vectors([_model(0)], alpha=float("nan"))


def test_path_that_is_not_a_task_vector(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("hello")
    with pytest.raises(ValueError, match="notes.safetensors' is not a safetensors file"):
        merge_task_vectors([TaskVector.load(bogus)])


@pytest.mark.parametrize("method", ["score", "ties", "pcb"])
def test_merging_key_subsets_and_joining_them_equals_one_merge(method: str) -> None:
    """What a merge split across processes does: each merges its keys, statistics still see the whole model."""
    tvs = [_model(s, torch.float64) for s in range(3)]
    whole = merge_task_vectors(tvs, method, device="cpu")
    keys = list(tvs[0])
    parts = [merge_task_vectors(tvs, method, device="cpu", keys=keys[i::2]) for i in range(2)]
    assert sorted(parts[0]) == sorted(keys[0::2]) and sorted(parts[1]) == sorted(keys[1::2])
    for part in parts:
        for key in part:
            assert torch.equal(part[key], whole[key]), key


def test_unknown_keys_subset() -> None:
    with pytest.raises(ValueError, match="are not keys of the task vectors"):
        merge_task_vectors([_model(0)], keys=["nope"])


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("method", ["score", "tsv"])
def test_a_key_of_fewer_directions_than_experts_gets_the_mean_with_a_warning_naming_it(
    method: str, cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning_score.merging import FactorCache

    tvs = [_model(s) for s in range(6)]  # positional_embedding is 5×8: r = 5 < T = 6, so ⌊r/T⌋ = 0
    with caplog.at_level("WARNING"):
        merged = merge_task_vectors(tvs, method, device="cpu", factors=FactorCache() if cached else None)
    small = "positional_embedding"
    assert torch.equal(merged[small], torch.stack([tv[small] for tv in tvs]).mean(0))  # not 0, not arbitrary
    assert f"{method}: 1 key(s) have fewer singular directions than the 6 experts merged" in caplog.text
    assert f"'{small}' [5, 8]. They get the mean of the experts' updates instead" in caplog.text
    without = merge_task_vectors([{k: v for k, v in tv.items() if k != small} for tv in tvs], method, device="cpu")
    for key in without:  # every key of k = ⌊r/T⌋ ≥ 1 merged exactly as before
        assert torch.equal(merged[key], without[key]), key
    caplog.clear()
    with caplog.at_level("WARNING"):
        merge_task_vectors(tvs[:5], method, device="cpu")  # T = r: one direction each, no warning
    assert "fewer singular directions" not in caplog.text
