"""FactorCache: each expert's SVDs computed once and reused, with merges bit-identical to the path without it.

Every SVD-based method (SCORE's four variants and both sign conventions, TSV-M, ESM's TSV-merged layers) is
merged in a leave-one-out pattern without the cache, and with it cold and warm, in memory and from files; every
merged tensor must equal the uncached one bit for bit (torch.equal). The uncached path itself is checked against
the float64 references in test_score.py / test_methods.py / test_esm.py; one float64 check here ties the cached
path to the reference directly.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_score import TaskVector
from lightning_score.merging import FactorCache, get_method, list_methods, merge_task_vectors
from lightning_score.merging.factor_files import FactorFile
from lightning_score.merging.svd import leading_triplets
from tests.merging import reference
from tests.processes import WORKER_THREADS, in_fresh_process, plain_merge

# (method, options): every registered use of the per-task SVDs
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("score", {}),
    ("score", {"variant": "diagonal"}),
    ("score", {"variant": "off_diagonal"}),
    ("score", {"variant": "full"}),
    ("score", {"sign_convention": "canonical"}),
    ("score", {"variant": "diagonal", "sign_convention": "canonical"}),
    ("score", {"z": 1.0, "divide_by_tasks": False}),
    ("tsv", {}),
]


def _expert(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Matrices of several shapes (tall, wide, square, odd, two of each for batching) sharing a component."""
    g = torch.Generator().manual_seed(seed)
    common = torch.Generator().manual_seed(999)
    shapes = {
        "positional_embedding": (5, 12),
        "transformer.resblocks.0.attn.in_proj_weight": (36, 12),
        "transformer.resblocks.0.attn.out_proj.weight": (12, 12),
        "transformer.resblocks.0.mlp.c_fc.weight": (48, 12),
        "transformer.resblocks.0.mlp.c_proj.weight": (12, 48),
        "transformer.resblocks.1.attn.in_proj_weight": (36, 12),
        "transformer.resblocks.1.attn.out_proj.weight": (12, 12),
        "transformer.resblocks.1.mlp.c_fc.weight": (48, 12),
        "transformer.resblocks.1.mlp.c_proj.weight": (12, 48),
        "proj": (12, 7),
    }
    out = {
        k: (torch.randn(s, generator=g) + 0.5 * torch.randn(s, generator=common)).to(dtype) for k, s in shapes.items()
    }
    out["transformer.resblocks.0.ln_1.weight"] = torch.randn(12, generator=g).to(dtype)
    return out


def _experts(count: int = 5, dtype: torch.dtype = torch.float32) -> list[TaskVector]:
    return [TaskVector(_expert(s, dtype), {"name": f"d{s}"}) for s in range(count)]


def _saved(tmp_path: Path, count: int = 5) -> list[Path]:
    return [tv.save(tmp_path / f"d{i}.safetensors") for i, tv in enumerate(_experts(count))]


def _assert_identical(a: TaskVector, b: TaskVector, label: str) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{label}: {key} differs by {(a[key] - b[key]).abs().max().item():.3g}"


def _leave_one_out(tvs: list[TaskVector], cache: FactorCache | None, rows=ROWS, **engine: Any) -> dict:
    out = {}
    for target in range(len(tvs)):
        sources = [tv for i, tv in enumerate(tvs) if i != target]
        for method, options in rows:
            out[(target, method, str(options))] = merge_task_vectors(
                sources, method, device="cpu", factors=cache, **engine, **options
            )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leave_one_out_is_bit_identical_cold_and_warm(dtype: torch.dtype) -> None:
    tvs = _experts(5, dtype)
    plain = _leave_one_out(tvs, None)
    cache = FactorCache()
    cold = _leave_one_out(tvs, cache)
    warm = _leave_one_out(tvs, cache)  # every factorization and every basis of the last target already held
    for name, merged in plain.items():
        _assert_identical(cold[name], merged, f"cold {name}")
        _assert_identical(warm[name], merged, f"warm {name}")
    matrices = sum(v.ndim == 2 for v in _expert(0).values())
    assert cache.stats["svd_computed"] == 5 * matrices  # each expert's SVDs once, for 5 targets x 8 rows x 2
    assert cache.stats["derived_reused"] > 0


def test_each_expert_is_factorized_once_across_targets_and_rows() -> None:
    tvs = _experts(4)
    cache = FactorCache(min_tasks=3)
    _leave_one_out(tvs, cache)
    matrices = sum(v.ndim == 2 for v in _expert(0).values())
    assert cache.stats["svd_computed"] == 4 * matrices
    # per target and key: one basis per sign convention (svd, canonical) and one projection per convention and
    # threshold-independent SCORE options; every other row reuses them
    assert cache.stats["derived_computed"] == 4 * matrices * 4


def test_cached_float64_merge_matches_the_reference() -> None:
    tvs = _experts(3, torch.float64)
    cache = FactorCache()
    for variant in ("trimmed", "diagonal", "off_diagonal", "full"):
        merged = merge_task_vectors(tvs, "score", device="cpu", factors=cache, variant=variant)
        key = "transformer.resblocks.0.mlp.c_fc.weight"
        expected = reference.score([tv[key] for tv in tvs], variant=variant)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-10)
    key = "proj"
    tsv = merge_task_vectors(tvs, "tsv", device="cpu", factors=cache)
    torch.testing.assert_close(tsv[key], reference.tsv([tv[key] for tv in tvs]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_any_number_of_experts_including_one(T: int) -> None:
    tvs = _experts(T)
    cache = FactorCache(min_tasks=3)  # T < 3 needs more triplets than the cache keeps by default
    for method, options in ROWS:
        plain = merge_task_vectors(tvs, method, device="cpu", **options)
        _assert_identical(merge_task_vectors(tvs, method, device="cpu", factors=cache, **options), plain, method)


def test_esm_tsv_layers_reuse_the_factors_and_stay_identical() -> None:
    tvs = _experts(3, torch.float64)
    g = torch.Generator().manual_seed(5)
    targets = [k for k in tvs[0] if k.endswith(("in_proj_weight", "c_fc.weight", "c_proj.weight"))]
    acts = [{k: torch.randn(60, tvs[0][k].shape[1], generator=g, dtype=torch.float64) for k in targets} for _ in tvs]
    cache = FactorCache()
    plain = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    cached = merge_task_vectors(tvs, "esm", device="cpu", activations=acts, factors=cache)
    _assert_identical(cached, plain, "esm")
    tsv_keys = [k for k, v in tvs[0].items() if v.ndim == 2 and k not in targets]
    assert cache.stats["svd_computed"] == 3 * len(tsv_keys)  # the target layers are not factorized
    tsv = merge_task_vectors(tvs, "tsv", device="cpu", factors=cache)  # reuses ESM's TSV layers' bases
    _assert_identical(tsv, merge_task_vectors(tvs, "tsv", device="cpu"), "tsv after esm")
    assert cache.stats["derived_reused"] == len(tsv_keys)


def test_esm_reads_its_tsv_layers_factors_from_files(tmp_path: Path) -> None:
    tvs = [TaskVector(_expert(s, torch.float64), {"name": f"d{s}"}) for s in range(3)]
    paths = [tv.save(tmp_path / f"d{i}.safetensors") for i, tv in enumerate(tvs)]
    targets = [k for k in tvs[0] if k.endswith(("in_proj_weight", "c_fc.weight"))]
    g = torch.Generator().manual_seed(6)
    acts = [{k: torch.randn(60, tvs[0][k].shape[1], generator=g, dtype=torch.float64) for k in targets} for _ in tvs]
    plain = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=FactorCache(save=True))
    reader = FactorCache(save=True)
    from_files = merge_task_vectors(
        [TaskVector.load(p) for p in paths], "esm", device="cpu", activations=acts, factors=reader
    )
    _assert_identical(from_files, plain, "esm from files")
    assert reader.stats["svd_computed"] == 0 and reader.stats["svd_from_file"] > 0


def test_methods_without_factorizations_ignore_the_cache() -> None:
    tvs = _experts(3)
    cache = FactorCache()
    for method in [m for m in list_methods() if not get_method(m).needs_data and m not in ("score", "tsv")]:
        _assert_identical(
            merge_task_vectors(tvs, method, device="cpu", factors=cache),
            merge_task_vectors(tvs, method, device="cpu"),
            method,
        )
    assert cache.stats["svd_computed"] == 0 and cache.nbytes == 0


def test_min_tasks_keeps_fewer_triplets_and_changes_nothing() -> None:
    tvs = _experts(5)
    full, truncated = FactorCache(), FactorCache(min_tasks=4)
    a = _leave_one_out(tvs, full, rows=[("tsv", {})])
    b = _leave_one_out(tvs, truncated, rows=[("tsv", {})])
    for name in a:
        _assert_identical(a[name], b[name], str(name))
    assert truncated.nbytes < 0.6 * full.nbytes


def test_max_bytes_bounds_the_memory_and_changes_nothing() -> None:
    tvs = _experts(5)
    plain = _leave_one_out(tvs, None, rows=ROWS[:2])
    bound = 20_000
    cache = FactorCache(max_bytes=bound)
    bounded = _leave_one_out(tvs, cache, rows=ROWS[:2])
    for name in plain:
        _assert_identical(bounded[name], plain[name], str(name))
    assert 0 < cache.nbytes <= bound


def test_derived_results_of_an_earlier_set_of_experts_are_dropped() -> None:
    tvs = _experts(4)
    cache = FactorCache(reuse_bases=True)
    merge_task_vectors(tvs[:3], "score", device="cpu", factors=cache)
    with_bases = cache.nbytes
    merge_task_vectors(tvs[1:], "score", device="cpu", factors=cache)  # another target: the first set's go
    factors_only = FactorCache(reuse_bases=False)
    merge_task_vectors(tvs[:3], "score", device="cpu", factors=factors_only)
    merge_task_vectors(tvs[1:], "score", device="cpu", factors=factors_only)
    assert factors_only.stats["derived_computed"] == 0
    assert cache.nbytes - factors_only.nbytes == pytest.approx(with_bases - factors_only.nbytes / 4 * 3, rel=0.05)


def test_factors_of_other_inputs_are_never_used() -> None:
    """A method that transforms the deltas before using factors gets factorizations of what it passes."""
    tvs = _experts(3)
    cache = FactorCache()
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    stacked = torch.stack([tv[key] for tv in tvs])
    experts = cache.prepare(
        tvs, [key], device=torch.device("cpu"), dtypes={key: torch.float32}, shapes={key: tuple(stacked.shape[1:])},
        load=lambda index, k, dtype: tvs[index][k].to(dtype),
    )  # fmt: skip
    factors = experts.key(key, stacked)
    other = stacked * 2
    for got, expected in zip(factors.leading(other, 4), leading_triplets(other, 4), strict=True):
        assert torch.equal(got, expected)
    assert factors.reuse(other, "x", lambda: 1) == 1 and factors.reuse(other, "x", lambda: 2) == 2
    stacked.mul_(-1)  # changed in place after the engine loaded it: not the engine's tensor any more
    for got, expected in zip(factors.leading(stacked, 4), leading_triplets(stacked, 4), strict=True):
        assert torch.equal(got, expected)


def test_a_derived_result_is_computed_once_per_set_of_experts_and_counted() -> None:
    cache = FactorCache()
    computed: list[str] = []

    def compute(label: str) -> torch.Tensor:
        computed.append(label)
        return torch.ones(4)

    first = cache.derived("experts A", ("w", "basis"), lambda: compute("A"))
    assert cache.derived("experts A", ("w", "basis"), lambda: compute("A again")) is first
    cache.derived("experts B", ("w", "basis"), lambda: compute("B"))
    assert computed == ["A", "B"] and cache.stats["derived_computed"] == 2 and cache.stats["derived_reused"] == 1
    assert cache.nbytes == 2 * 16
    cache.clear()
    assert cache.nbytes == 0


# --- files -------------------------------------------------------------------------------------------


def test_factors_are_saved_beside_the_task_vector_and_read_back(tmp_path: Path) -> None:
    paths = _saved(tmp_path, 4)
    plain = _leave_one_out([TaskVector.load(p) for p in paths], None)
    writer = FactorCache(save=True)
    cold = _leave_one_out([TaskVector.load(p) for p in paths], writer)
    files = sorted(tmp_path.glob("d*.factors-*.safetensors"))
    assert [f.name.split(".factors-")[0] for f in files] == ["d0", "d1", "d2", "d3"]
    assert writer.stats["svd_computed"] > 0 and writer.stats["files_written"] == 4
    reader = FactorCache(save=True)  # another process: nothing in memory
    warm = _leave_one_out([TaskVector.load(p) for p in paths], reader)
    assert reader.stats["svd_computed"] == 0 and reader.stats["svd_from_file"] > 0
    assert reader.stats["files_written"] == 0
    for name, merged in plain.items():
        _assert_identical(cold[name], merged, f"cold {name}")
        _assert_identical(warm[name], merged, f"from file {name}")


def test_files_go_to_a_directory_and_in_memory_task_vectors_get_none_without_one(tmp_path: Path) -> None:
    tvs = _experts(3)
    beside = FactorCache(save=True)
    merge_task_vectors(tvs, "tsv", device="cpu", factors=beside)
    assert beside.stats["files_written"] == 0  # in-memory task vectors: nowhere to put them
    folder = FactorCache(save=True, directory=tmp_path / "factors")
    merge_task_vectors(tvs, "tsv", device="cpu", factors=folder)
    assert len(list((tmp_path / "factors").glob("factors-*.safetensors"))) == 3


def test_a_file_grows_when_a_merge_needs_more_keys_or_triplets(tmp_path: Path) -> None:
    paths = _saved(tmp_path, 4)
    tvs = [TaskVector.load(p) for p in paths]
    cache = FactorCache(save=True, min_tasks=4)
    merge_task_vectors(tvs, "tsv", device="cpu", factors=cache, keys=["proj"])
    file = next(tmp_path.glob("d0.factors-*.safetensors"))
    fingerprint = tvs[0].content_fingerprint()
    assert FactorFile(file, fingerprint, torch.device("cpu"), torch.float32).ranks == {"proj": 7 // 4}
    merge_task_vectors(tvs[:2], "tsv", device="cpu", factors=FactorCache(save=True, min_tasks=4))  # T=2: more
    ranks = FactorFile(file, fingerprint, torch.device("cpu"), torch.float32).ranks
    assert ranks["proj"] == 7 // 2 and ranks["transformer.resblocks.0.mlp.c_fc.weight"] == 12 // 2
    again = FactorCache(save=True)
    _assert_identical(
        merge_task_vectors(tvs[:2], "tsv", device="cpu", factors=again),
        merge_task_vectors(tvs[:2], "tsv", device="cpu"),
        "grown",
    )
    assert again.stats["svd_computed"] == 0


def test_a_damaged_or_foreign_file_is_ignored_and_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _saved(tmp_path, 3)
    merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=FactorCache(save=True))
    file = next(tmp_path.glob("d1.factors-*.safetensors"))
    file.write_bytes(b"not a safetensors file")
    cache = FactorCache(save=True)
    with caplog.at_level(logging.WARNING):
        merged = merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=cache)
    assert "Ignoring factor file" in caplog.text and "d1.factors-" in caplog.text
    _assert_identical(merged, merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu"), "tsv")
    assert cache.stats["files_written"] == 1
    FactorFile(file, TaskVector.load(paths[1]).content_fingerprint(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="holds factors of"):
        FactorFile(file, "blake2b:other", torch.device("cpu"), torch.float32)


def _byte_range(file: Path, tensor: str) -> tuple[int, int]:
    """Where a tensor's bytes lie in a safetensors file (the 8-byte header length, the JSON header, the data)."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + length])[tensor]["data_offsets"]
    return 8 + length + start, 8 + length + end


def _rewrite(file: Path, change: Any) -> None:
    """Write the file again as a foreign writer would: ``change(tensors, header)`` edits them in place."""
    with safe_open(str(file), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    change(tensors, header)
    save_file(tensors, str(file), metadata=header)


def _damage(file: Path, damage: str) -> None:
    """Damage the factors of key "proj" on disk."""
    if damage == "one flipped bit in U" or damage == "one flipped bit in S":
        start, _ = _byte_range(file, f"proj::{damage[-1]}")
        with open(file, "r+b") as handle:  # the exponent's top bit of the first float32: x -> ~x * 2^128
            handle.seek(start + 3)
            byte = handle.read(1)[0]
            handle.seek(start + 3)
            handle.write(bytes([byte ^ 0x40]))
    elif damage == "a NaN in U":
        start, _ = _byte_range(file, "proj::U")
        with open(file, "r+b") as handle:
            handle.seek(start)
            handle.write(torch.tensor([float("nan")]).numpy().tobytes())
    else:  # "fewer triplets than the header says": a writer cut the tensors but not the header's ranks
        _rewrite(file, lambda t, h: t.update({
            "proj::U": t["proj::U"][:, :-1].contiguous(), "proj::S": t["proj::S"][:-1], "proj::Vh": t["proj::Vh"][:-1]
        }))  # fmt: skip


DAMAGES = ["one flipped bit in U", "one flipped bit in S", "a NaN in U", "fewer triplets than the header says"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("method", ["score", "tsv"])
def test_damaged_factors_on_disk_are_never_used_but_computed_again_and_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, method: str
) -> None:
    paths = _saved(tmp_path, 3)
    merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu", factors=FactorCache(save=True))
    file = next(tmp_path.glob("d1.factors-*.safetensors"))
    _damage(file, damage)
    plain = merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu")
    cache = FactorCache(save=True)
    with caplog.at_level(logging.WARNING):
        merged = merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu", factors=cache)
    _assert_identical(merged, plain, damage)
    assert f"in '{file}' (e.g. ['proj']): their tensors do not match the digest" in caplog.text
    assert cache.stats["svd_computed"] == 1 and cache.stats["files_written"] == 1  # only the damaged key again
    fingerprint = TaskVector.load(paths[1]).content_fingerprint()
    repaired = FactorFile(file, fingerprint, torch.device("cpu"), torch.float32)
    assert repaired.damaged == [] and repaired.rank("proj") > 0


def test_a_rewrite_never_copies_a_damaged_entry(tmp_path: Path) -> None:
    paths = _saved(tmp_path, 3)
    tvs = [TaskVector.load(p) for p in paths]
    merge_task_vectors(tvs, "tsv", device="cpu", factors=FactorCache(save=True), keys=["proj"])
    file = next(tmp_path.glob("d1.factors-*.safetensors"))
    _damage(file, "one flipped bit in S")
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    merge_task_vectors(tvs, "tsv", device="cpu", factors=FactorCache(save=True), keys=[key])  # rewrites the file
    rewritten = FactorFile(file, tvs[1].content_fingerprint(), torch.device("cpu"), torch.float32)
    assert sorted(rewritten.ranks) == [key] and rewritten.damaged == []  # "proj" left out, not copied


def test_a_file_of_a_newer_format_version_is_neither_read_nor_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _saved(tmp_path, 3)
    merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=FactorCache(save=True))
    file = next(tmp_path.glob("d1.factors-*.safetensors"))

    def newer(tensors: dict, header: dict) -> None:  # another layout: S stored squared, say
        header["format_version"] = "3"
        for name in [n for n in tensors if n.endswith("::S")]:
            tensors[name] = tensors[name].square()

    _rewrite(file, newer)
    before = file.read_bytes()
    cache = FactorCache(save=True)
    with caplog.at_level(logging.WARNING):
        merged = merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=cache)
    _assert_identical(merged, merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu"), "newer")
    assert f"'{file}' was written in factor file format version 3, newer than this lightning-score reads" in caplog.text
    assert "It is left in place" in caplog.text
    assert file.read_bytes() == before and cache.stats["svd_from_file"] > 0  # the other experts' files still serve
    assert cache.stats["files_written"] == 0


def test_a_retrained_expert_gets_new_factors(tmp_path: Path) -> None:
    paths = _saved(tmp_path, 3)
    merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=FactorCache(save=True))
    TaskVector(_expert(7), {"name": "d0"}).save(paths[0])  # same file name, new content
    tvs = [TaskVector.load(p) for p in paths]
    cache = FactorCache(save=True)
    _assert_identical(
        merge_task_vectors(tvs, "tsv", device="cpu", factors=cache),
        merge_task_vectors(tvs, "tsv", device="cpu"),
        "retrained",
    )
    assert cache.stats["files_written"] == 1 and len(list(tmp_path.glob("d0.factors-*.safetensors"))) == 2


@pytest.mark.parametrize("edit", ["copy_ into an entry", "+= on an entry", "an entry of the dict replaced"])
def test_a_task_vector_edited_in_place_after_a_cached_merge_gets_new_factors(edit: str) -> None:
    tensors = [_expert(s) for s in range(3)]
    tvs = [TaskVector(t, {"name": f"d{i}"}) for i, t in enumerate(tensors)]
    cache = FactorCache()
    merge_task_vectors(tvs, "score", device="cpu", factors=cache)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    if edit == "copy_ into an entry":
        tvs[0][key].copy_(_expert(7)[key])
    elif edit == "+= on an entry":
        tvs[0][key].add_(1.0)
    else:
        tensors[0][key] = _expert(7)[key]  # the TaskVector holds this very dict
    again = merge_task_vectors(tvs, "score", device="cpu", factors=cache)
    fresh = [TaskVector({k: v.clone() for k, v in tv.items()}, {"name": tv.name}) for tv in tvs]
    _assert_identical(again, merge_task_vectors(fresh, "score", device="cpu"), edit)


def test_a_loaded_task_vector_edited_in_place_is_not_taken_for_its_file(tmp_path: Path) -> None:
    paths = _saved(tmp_path, 3)
    merge_task_vectors([TaskVector.load(p) for p in paths], "tsv", device="cpu", factors=FactorCache(save=True))
    tvs = [TaskVector.load(p, lazy=False) for p in paths]
    tvs[1]["proj"].mul_(-3.0)  # before any fingerprint of this object: the file's is known to the process
    cache = FactorCache(save=True)
    merged = merge_task_vectors(tvs, "tsv", device="cpu", factors=cache)
    fresh = [TaskVector({k: v.clone() for k, v in tv.items()}) for tv in tvs]
    _assert_identical(merged, merge_task_vectors(fresh, "tsv", device="cpu"), "edited after loading")
    assert tvs[1].content_fingerprint() != TaskVector.load(paths[1]).content_fingerprint()


def _race(paths: list[str], output: str, queue: Any) -> None:
    torch.set_num_threads(WORKER_THREADS)
    cache = FactorCache(save=True)
    merge_task_vectors([TaskVector.load(p) for p in paths], "score", device="cpu", factors=cache).save(output)
    queue.put(cache.stats["svd_computed"])


@pytest.mark.ddp  # several processes
def test_two_processes_racing_compute_each_file_once(tmp_path: Path) -> None:
    paths = [str(p) for p in _saved(tmp_path, 3)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    outputs = [str(tmp_path / "out" / f"merged{i}.safetensors") for i in range(2)]
    workers = [context.Process(target=_race, args=(paths, output, queue)) for output in outputs]
    for worker in workers:
        worker.start()
    computed = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # like with like: the expected merge in a process of its own, with the workers' thread count (the last bits of
    # an SVD depend on it: ~1e-6 relative between 1 and 2 threads on some CPUs)
    expected = in_fresh_process(plain_merge, paths, "score", threads=WORKER_THREADS)
    for output in outputs:
        _assert_identical(TaskVector.load(output), expected, output)
    matrices = sum(v.ndim == 2 for v in _expert(0).values())
    assert sum(computed) == 3 * matrices  # whoever waited for a lock read the other's file
    assert len(list(tmp_path.glob("*.factors-*.safetensors"))) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_held_lock_times_out_with_a_message_naming_it(tmp_path: Path) -> None:
    import filelock

    paths = _saved(tmp_path, 2)
    tvs = [TaskVector.load(p) for p in paths]
    cache = FactorCache(save=True, lock_timeout=0.2)
    merge_task_vectors(tvs[:1], "tsv", device="cpu", factors=FactorCache(save=True), keys=["proj"])
    lock = filelock.FileLock(str(next(tmp_path.glob("d0.factors-*.safetensors"))) + ".lock")
    with (
        lock,
        pytest.raises(
            TimeoutError, match=r"d0\.factors-.*\.lock': it is held by process .*do not delete the lock file"
        ),
    ):
        merge_task_vectors(tvs, "tsv", device="cpu", factors=cache)


# --- options ----------------------------------------------------------------------------------------


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="min_tasks must be an integer ≥ 1"):
        FactorCache(min_tasks=0)
    with pytest.raises(ValueError, match="max_bytes must be ≥ 0"):
        FactorCache(max_bytes=-1)


def test_factors_is_not_a_method_option() -> None:
    assert "factors" not in get_method("score").defaults and "factors" not in get_method("tsv").defaults


# --- the GPU path, forced on CPU: batched factorizations and prefetching --------------------------------


@pytest.mark.parametrize("with_cache", [False, True])
def test_batched_and_prefetched_merges_are_bit_identical(with_cache: bool) -> None:
    tvs = _experts(4)
    plain = _leave_one_out(tvs, None)
    forced = _leave_one_out(tvs, FactorCache() if with_cache else None, batch_svd=True, prefetch=True)
    for name, merged in plain.items():
        _assert_identical(forced[name], merged, str(name))


def test_batches_of_any_size_give_the_same_factors() -> None:
    tvs = _experts(3)
    keys = [k for k, v in tvs[0].items() if v.ndim == 2]
    shapes = {k: tuple(tvs[0][k].shape) for k in keys}

    def held(cache: FactorCache) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
        fingerprints = [tv.content_fingerprint() for tv in tvs]
        return {
            (t, k): cache._lookup(fp, k, torch.device("cpu"), torch.float32, 0) for t, fp in enumerate(fingerprints)
            for k in keys
        }  # fmt: skip

    caches = {}
    for label, options in {
        "one by one": {"batched": False},
        "one key per batch": {"batched": True, "batch_bytes": 1},
        "every same-shaped key in one batch": {"batched": True, "prefetch": True},
    }.items():
        cache = caches[label] = FactorCache()
        cache.prepare(
            tvs, keys, device=torch.device("cpu"), dtypes=dict.fromkeys(keys, torch.float32), shapes=shapes,
            load=lambda index, key, dtype: tvs[index][key].to(dtype), **options,
        )  # fmt: skip
    reference_factors = held(caches["one by one"])
    for label, cache in caches.items():
        for name, triplet in held(cache).items():
            for got, expected in zip(triplet, reference_factors[name], strict=True):
                assert torch.equal(got, expected), (label, name)
    for (t, key), (U, S, Vh) in reference_factors.items():  # and they are the SVD of the matrix
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, tvs[t][key], rtol=0, atol=1e-4)


def test_prefetching_reports_non_finite_values_at_their_key(tmp_path: Path) -> None:
    tvs = _experts(3)
    broken = dict(_expert(2))
    broken["transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = float("nan")
    tvs[2] = TaskVector(broken, {"name": "d2"})
    for options in ({"prefetch": True}, {"batch_svd": True, "prefetch": True}, {"factors": FactorCache()}):
        with pytest.raises(ValueError, match=r"'transformer.resblocks.1.mlp.c_fc.weight' of task 2 .* non-finite"):
            merge_task_vectors(tvs, "score", device="cpu", **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_cached_and_unbatched_merges_agree() -> None:
    """On CUDA every path factorizes each (> 32 × 32) matrix with the same solver, so the bits agree too."""
    g = torch.Generator().manual_seed(3)
    tvs = [
        TaskVector({f"transformer.resblocks.{b}.mlp.c_fc.weight": torch.randn(96, 48, generator=g) for b in range(3)})
        for _ in range(4)
    ]
    cache = FactorCache()
    for method, options in ROWS:
        unbatched = merge_task_vectors(tvs, method, device="cuda", batch_svd=False, prefetch=False, **options)
        batched = merge_task_vectors(tvs, method, device="cuda", **options)  # the default on CUDA
        cached = merge_task_vectors(tvs, method, device="cuda", factors=cache, **options)
        for key in unbatched:
            assert torch.equal(batched[key], unbatched[key]), (method, options, key)
            assert torch.equal(cached[key], unbatched[key]), (method, options, key)
    assert cache.stats["svd_computed"] == 4 * 3  # once per expert and key, whatever the rows (device "cuda:0")


def test_an_expert_factorized_ahead_is_only_read_by_the_merges(tmp_path: Path) -> None:
    """What a cluster's expert job does after training, so that the evaluation jobs compute no SVD."""
    paths = _saved(tmp_path, 4)
    for path in paths:
        FactorCache(save=True, min_tasks=3).factorize(TaskVector.load(path), num_tasks=3, device="cpu")
    evaluation = FactorCache(save=True, min_tasks=3)
    tvs = [TaskVector.load(p) for p in paths]
    merged = _leave_one_out(tvs, evaluation)
    assert evaluation.stats["svd_computed"] == 0 and evaluation.stats["files_written"] == 0
    plain = _leave_one_out(tvs, None)
    for name in plain:
        _assert_identical(merged[name], plain[name], str(name))


def test_the_merge_core_imports_no_lightning_open_clip_or_data() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_score.merging; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'open_clip', 'torchvision', 'lightning_score.data') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
