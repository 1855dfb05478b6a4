"""Subspace Alignment Ratio and singular spectra: a float64 reference, known answers, streaming, bad inputs."""

from __future__ import annotations

import doctest
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_score.analysis as analysis_module
from lightning_score import TaskVector
from lightning_score.analysis import (
    SingularSpectra,
    SubspaceAlignment,
    depth_key,
    effective_rank,
    key_alignment,
    singular_spectra,
    subspace_alignment,
)

# --- a float64 reference written from spec section 2: loops over pairs, full SVDs --------------------


def reference_rank(delta: torch.Tensor, energy: float) -> int:
    """Smallest k whose leading singular values hold at least `energy` of ‖Δ‖_F²."""
    s = torch.linalg.svdvals(delta.double()).tolist()
    total = sum(v * v for v in s)
    if total == 0:
        return 0
    running = 0.0
    for k, v in enumerate(s, start=1):
        running += v * v
        if running >= energy * total:
            return k
    return len(s)


def reference_basis(basis: torch.Tensor, energy: float) -> torch.Tensor:
    """U_{:k}: the k leading left singular vectors from a full SVD of the basis task."""
    U, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)
    return U[:, : reference_rank(basis, energy)]


def reference_matrix(deltas: list[torch.Tensor], energy: float) -> torch.Tensor:
    """Every ordered pair (i = j included): row i = basis task, column j = projected task."""
    T = len(deltas)
    out = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        Uk = reference_basis(deltas[i], energy)
        projector = Uk @ Uk.T
        for j in range(T):
            other = deltas[j].double()
            out[i, j] = torch.linalg.norm(projector @ other) / torch.linalg.norm(other)
    return out


# --- inputs ---------------------------------------------------------------------------------------


def decaying(m: int, n: int, g: torch.Generator, decay: float) -> torch.Tensor:
    """A random m×n matrix with singular values decay**l, so that effective ranks vary between tasks."""
    r = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (P * s) @ Q.T


def model(seed: int, dtype: torch.dtype = torch.float64, decay: float = 0.8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 3, 2, 2, generator=g).to(dtype),
        "positional_embedding": decaying(5, 8, g, decay).to(dtype),
        "transformer.resblocks.0.attn.in_proj_weight": decaying(24, 8, g, decay).to(dtype),
        "transformer.resblocks.0.attn.in_proj_bias": torch.randn(24, generator=g).to(dtype),
        "transformer.resblocks.0.mlp.c_proj.weight": decaying(8, 32, g, decay).to(dtype),
        "transformer.resblocks.1.mlp.c_fc.weight": decaying(16, 16, g, decay).to(dtype),
        "text_projection": torch.randn(8, 6, generator=g).to(dtype),
        "proj": decaying(8, 6, g, decay).to(dtype),
    }


MATRIX_KEYS = [  # depth order (embeddings, blocks, head), whatever the task vectors' own order
    "positional_embedding",
    "transformer.resblocks.0.attn.in_proj_weight",
    "transformer.resblocks.0.mlp.c_proj.weight",
    "transformer.resblocks.1.mlp.c_fc.weight",
    "proj",
]


def tasks(decays: tuple[float, ...] = (0.5, 0.7, 0.9)) -> list[TaskVector]:
    return [TaskVector(model(i, decay=d), {"name": f"d{i}", "domain": f"d{i}"}) for i, d in enumerate(decays)]


def orthonormal(m: int, g: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return Q


# --- the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.97, 0.5, 0.999])
def test_matches_the_float64_reference_per_key_and_on_average(energy: float) -> None:
    tvs = tasks()
    sar = subspace_alignment(tvs, energy)
    assert sar.keys == MATRIX_KEYS
    assert sar.names == ["d0", "d1", "d2"] and sar.energy == energy
    expected_mean = torch.zeros(3, 3, dtype=torch.float64)
    for key in MATRIX_KEYS:
        deltas = [tv[key] for tv in tvs]
        expected = reference_matrix(deltas, energy)
        torch.testing.assert_close(sar.per_key[key], expected, rtol=0, atol=1e-10, msg=key)
        assert sar.ranks[key].tolist() == [reference_rank(d, energy) for d in deltas], key
        assert sar.shapes[key] == tuple(deltas[0].shape)
        expected_mean += expected / len(MATRIX_KEYS)
    torch.testing.assert_close(sar.matrix, expected_mean, rtol=0, atol=1e-10)
    assert sar.matrix.dtype == torch.float64 and sar.matrix.device.type == "cpu"
    # the tasks have different spectra, so the ranks differ between tasks and the numbers are non-trivial
    assert len({tuple(r.tolist()) for r in sar.ranks.values()}) > 1
    off = sar.matrix[~torch.eye(3, dtype=torch.bool)]
    assert bool((off > 0.05).all()) and bool((off < 0.999).all())


def test_key_alignment_matches_the_reference_for_wide_and_tall_matrices() -> None:
    g = torch.Generator().manual_seed(3)
    for shape in [(12, 5), (5, 12), (7, 7)]:
        deltas = [decaying(*shape, g, d) for d in (0.3, 0.6, 0.95, 0.8)]
        sar, ranks = key_alignment(torch.stack(deltas))
        torch.testing.assert_close(sar, reference_matrix(deltas, 0.97), rtol=0, atol=1e-10)
        assert ranks.tolist() == [reference_rank(d, 0.97) for d in deltas]


# --- known answers --------------------------------------------------------------------------------


def test_identical_low_rank_task_vectors_give_one_everywhere() -> None:
    g = torch.Generator().manual_seed(1)
    low_rank = {}
    for key in MATRIX_KEYS:  # rank 2 with a flat-ish spectrum: k = 2 and the basis holds all of Δ
        U, S, Vh = torch.linalg.svd(decaying(*model(0)[key].shape, g, 0.9), full_matrices=False)
        low_rank[key] = (U[:, :2] * S[:2]) @ Vh[:2]
    sar = subspace_alignment([low_rank, low_rank, {k: -2.5 * v for k, v in low_rank.items()}])
    torch.testing.assert_close(sar.matrix, torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    for key in MATRIX_KEYS:
        torch.testing.assert_close(sar.per_key[key], torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_identical_full_rank_task_vectors_give_one_at_full_energy_and_sqrt_captured_energy_otherwise() -> None:
    same = model(0, decay=0.8)
    at_full = subspace_alignment([same, same, same], energy=1.0)
    torch.testing.assert_close(at_full.matrix, torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    # At energy 0.97 the basis holds ≥ 97 % of the norm but not all of it: SAR(Δ | Δ) = sqrt(captured) < 1.
    sar = subspace_alignment([same, same, same])
    below_one = 0
    for key in MATRIX_KEYS:
        s = torch.linalg.svdvals(same[key])
        k = int(sar.ranks[key][0])
        captured = math.sqrt(float((s[:k] ** 2).sum() / (s**2).sum()))
        torch.testing.assert_close(
            sar.per_key[key], torch.full((3, 3), captured, dtype=torch.float64), atol=1e-12, rtol=0
        )
        assert math.sqrt(0.97) <= captured <= 1.0
        below_one += captured < 1.0 - 1e-9
    assert below_one >= 2  # the larger keys need fewer than r directions, so their diagonal is below 1


def test_orthogonal_column_spaces_give_zero_off_the_diagonal() -> None:
    g = torch.Generator().manual_seed(2)
    m, n, T, width = 12, 9, 3, 3
    Q = orthonormal(m, g)
    deltas = []
    for t in range(T):
        columns = Q[:, t * width : (t + 1) * width]  # disjoint blocks of one orthonormal basis
        rows, _ = torch.linalg.qr(torch.randn(n, width, generator=g, dtype=torch.float64))
        deltas.append((columns * torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64)) @ rows.T)
    sar = subspace_alignment([{"w": d} for d in deltas])
    torch.testing.assert_close(sar.matrix, torch.eye(T, dtype=torch.float64), rtol=0, atol=1e-12)
    assert sar.ranks["w"].tolist() == [3, 3, 3]


def test_sar_is_not_symmetric_and_rows_are_the_basis_task() -> None:
    m, n = 6, 5
    narrow = torch.zeros(m, n, dtype=torch.float64)
    narrow[0, 0] = 2.0  # rank 1, column space span(e_0)
    wide = torch.zeros(m, n, dtype=torch.float64)
    wide[0, 1] = wide[1, 2] = wide[2, 3] = 1.0  # rank 3 with a flat spectrum, column space span(e_0, e_1, e_2)
    sar = subspace_alignment([TaskVector({"w": narrow}, {"name": "narrow"}), TaskVector({"w": wide}, {"name": "wide"})])
    # row = basis task, column = projected task
    assert sar.matrix[1, 0].item() == pytest.approx(1.0, abs=1e-12)  # narrow lies inside wide's subspace
    assert sar.matrix[0, 1].item() == pytest.approx(1 / math.sqrt(3), abs=1e-12)  # a third of wide lies in e_0
    assert not torch.allclose(sar.matrix, sar.matrix.T)
    table = sar.to_table()
    assert "row i = basis task i" in table and "narrow" in table and "0.577" in table


# --- effective rank -------------------------------------------------------------------------------


def test_effective_rank_edges() -> None:
    g = torch.Generator().manual_seed(4)
    full = torch.randn(9, 6, generator=g, dtype=torch.float64)
    assert effective_rank(torch.linalg.svdvals(full), 1.0).item() == 6  # energy 1.0: every direction
    rank_one = torch.outer(
        torch.randn(9, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    )
    for energy in (1e-9, 0.5, 0.97, 1.0):
        assert effective_rank(torch.linalg.svdvals(rank_one), energy).item() == 1, energy
    assert effective_rank(torch.zeros(4), 0.97).item() == 0
    s = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert effective_rank(s, 0.9).tolist() == [1, 3]  # batched; 9/10 reaches 0.9 exactly (non-strict)
    assert effective_rank(s, 0.6).tolist() == [1, 2]
    sar = subspace_alignment([{"w": full}, {"w": rank_one}], energy=1.0)
    assert sar.ranks["w"].tolist() == [6, 1]
    torch.testing.assert_close(sar.per_key["w"], reference_matrix([full, rank_one], 1.0), rtol=0, atol=1e-10)


# --- keys, streaming, dtypes ----------------------------------------------------------------------


def test_key_selection_prefix_list_and_predicate() -> None:
    tvs = tasks()
    everything = subspace_alignment(tvs)
    blocks = subspace_alignment(tvs, prefix="transformer.")
    assert blocks.keys == [k for k in MATRIX_KEYS if k.startswith("transformer.")]
    for key in blocks.keys:
        assert torch.equal(blocks.per_key[key], everything.per_key[key])
    torch.testing.assert_close(blocks.matrix, torch.stack([everything.per_key[k] for k in blocks.keys]).mean(0))
    two = subspace_alignment(tvs, keys=["proj", "positional_embedding"])
    assert two.keys == ["positional_embedding", "proj"]  # depth order, not the request's
    both = subspace_alignment(tvs, prefix=("proj", "positional"))
    assert both.keys == two.keys
    only_square = subspace_alignment(tvs, is_matrix=lambda key, shape: len(shape) == 2 and shape[0] == shape[1])
    assert only_square.keys == ["transformer.resblocks.1.mlp.c_fc.weight"]
    # text_projection is 2-D but not a matrix key (spec section 0)
    assert "text_projection" not in everything.keys


def test_lazy_files_on_disk_give_identical_results(tmp_path: Path) -> None:
    tvs = tasks()
    paths = [tv.save(tmp_path / f"{tv.name}.safetensors") for tv in tvs]
    lazy = [TaskVector.load(p) for p in paths]
    in_memory, from_disk = subspace_alignment(tvs), subspace_alignment(lazy, progress=True)
    assert torch.equal(in_memory.matrix, from_disk.matrix)
    assert all(torch.equal(in_memory.per_key[k], from_disk.per_key[k]) for k in MATRIX_KEYS)
    assert from_disk.names == ["d0", "d1", "d2"]
    a, b = singular_spectra(tvs), singular_spectra(lazy)
    assert a.to_dict() == b.to_dict()


def test_low_precision_inputs_and_float32_compute() -> None:
    tvs64 = tasks()
    reference = subspace_alignment(tvs64)
    for dtype, tolerance in [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)]:
        low = [TaskVector({k: v.to(dtype) for k, v in tv.items()}, {"name": tv.name}) for tv in tvs64]
        result = subspace_alignment(low)  # computed in float64 from the low-precision values
        assert result.matrix.dtype == torch.float64
        torch.testing.assert_close(result.matrix, reference.matrix, rtol=0, atol=tolerance, msg=str(dtype))
    fast = subspace_alignment(tvs64, dtype=torch.float32)
    torch.testing.assert_close(fast.matrix, reference.matrix, rtol=0, atol=1e-5)


def test_plain_mappings_get_default_names_and_unnamed_task_vectors_too() -> None:
    a, b = model(0), model(1)
    sar = subspace_alignment([a, TaskVector(b)])
    assert sar.names == ["task 0", "task 1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    tvs = tasks()
    cpu, gpu = subspace_alignment(tvs), subspace_alignment(tvs, device="cuda")
    assert gpu.matrix.device.type == "cpu"
    torch.testing.assert_close(gpu.matrix, cpu.matrix, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        subspace_alignment(tvs, device="cuda", dtype=torch.float32).matrix, cpu.matrix, rtol=0, atol=1e-4
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cuda_requested_without_cuda_says_so() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        subspace_alignment(tasks(), device="cuda")


# --- zero matrices --------------------------------------------------------------------------------


def test_zero_task_matrices_give_no_nan(caplog: pytest.LogCaptureFixture) -> None:
    tvs = [model(i, decay=d) for i, d in enumerate((0.5, 0.7, 0.9))]
    tvs[1]["proj"] = torch.zeros_like(tvs[1]["proj"])  # task 1 did not change `proj`
    with caplog.at_level(logging.WARNING, logger="lightning_score.analysis"):
        sar = subspace_alignment(tvs)
    assert "all-zero" in caplog.text
    assert not torch.isnan(sar.matrix).any()
    per = sar.per_key["proj"]
    assert sar.ranks["proj"].tolist()[1] == 0
    assert per[:, 1].tolist() == [0.0, 0.0, 0.0]  # SAR(0 | Δ_i) := 0
    assert per[1].tolist() == [0.0, 0.0, 0.0]  # an empty basis holds nothing
    # column 1's mean skips `proj`; the other columns average every key
    others = [k for k in MATRIX_KEYS if k != "proj"]
    torch.testing.assert_close(sar.matrix[:, 1], torch.stack([sar.per_key[k][:, 1] for k in others]).mean(0))
    torch.testing.assert_close(sar.matrix[:, 0], torch.stack([sar.per_key[k][:, 0] for k in MATRIX_KEYS]).mean(0))
    # a task that is zero everywhere: its column and row are 0
    zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    sar = subspace_alignment([tvs[0], zero])
    assert sar.matrix[:, 1].tolist() == [0.0, 0.0] and sar.matrix[1].tolist() == [0.0, 0.0]
    spectra = singular_spectra([tvs[0], zero])
    assert spectra.effective_rank["proj"].tolist()[1] == 0 and spectra.frobenius_norm["proj"][1].item() == 0.0


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 7),
    n=st.integers(1, 7),
    T=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    energy=st.floats(0.05, 1.0),
    scale=st.sampled_from([-1e6, -3.0, 1e-6, 2.0, 1e12]),
)
def test_properties_range_scale_invariance_and_reference(
    m: int, n: int, T: int, seed: int, energy: float, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(T, m, n, generator=g, dtype=torch.float64)
    sar, ranks = key_alignment(deltas, energy)
    assert bool(((sar >= 0) & (sar <= 1)).all())
    assert bool((torch.diagonal(sar) >= math.sqrt(energy) - 1e-12).all())
    scaled, scaled_ranks = key_alignment(deltas * scale, energy)
    torch.testing.assert_close(scaled, sar, rtol=0, atol=1e-10)
    assert torch.equal(scaled_ranks, ranks)
    torch.testing.assert_close(sar, reference_matrix(list(deltas), energy), rtol=0, atol=1e-10)


# --- singular spectra -----------------------------------------------------------------------------


def test_singular_spectra_against_the_reference() -> None:
    tvs = tasks()
    spectra = singular_spectra(tvs, energy=0.9, top=3)
    assert spectra.keys == MATRIX_KEYS and spectra.names == ["d0", "d1", "d2"] and spectra.top == 3
    for key in MATRIX_KEYS:
        expected = torch.stack([torch.linalg.svdvals(tv[key].double()) for tv in tvs])
        torch.testing.assert_close(spectra.singular_values[key], expected[:, :3], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            spectra.frobenius_norm[key], torch.stack([torch.linalg.norm(tv[key]) for tv in tvs]), rtol=1e-12, atol=0
        )
        assert spectra.effective_rank[key].tolist() == [reference_rank(tv[key], 0.9) for tv in tvs]
        r = min(tvs[0][key].shape)
        torch.testing.assert_close(spectra.rank_fraction(key), spectra.effective_rank[key].double() / r)
    everything = singular_spectra(tvs, top=None)
    assert everything.singular_values["transformer.resblocks.0.attn.in_proj_weight"].shape == (3, 8)
    big_top = singular_spectra(tvs, top=1000)
    assert big_top.singular_values["proj"].shape == (3, 6)
    table = spectra.to_table()
    assert "transformer.resblocks.0.attn.in_proj_weight" in table and "24x8" in table and "d2" in table


def test_json_round_trips() -> None:
    tvs = tasks()
    sar = subspace_alignment(tvs)
    record = json.loads(json.dumps(sar.to_dict()))
    assert record["orientation"].startswith("matrix[i][j] = SAR(Δ_j | Δ_i)")
    assert record["mean_off_diagonal"] == pytest.approx(sar.mean_off_diagonal())
    back = SubspaceAlignment.from_dict(record)
    assert torch.equal(back.matrix, sar.matrix) and back.names == sar.names and back.keys == sar.keys
    assert all(torch.equal(back.ranks[k], sar.ranks[k]) for k in sar.keys) and back.shapes == sar.shapes
    spectra = singular_spectra(tvs, top=4)
    again = SingularSpectra.from_dict(json.loads(json.dumps(spectra.to_dict())))
    assert again.to_dict() == spectra.to_dict()
    one = subspace_alignment(tvs[:1])
    assert (
        one.matrix.shape == (1, 1)
        and math.isnan(one.mean_off_diagonal())
        and one.to_dict()["mean_off_diagonal"] is None
    )
    json.dumps(one.to_dict())


# --- bad inputs -----------------------------------------------------------------------------------


def test_empty_and_non_sequence_inputs() -> None:
    with pytest.raises(ValueError, match="subspace_alignment got an empty list"):
        subspace_alignment([])
    with pytest.raises(ValueError, match="singular_spectra got an empty list"):
        singular_spectra([])
    with pytest.raises(ValueError, match="Wrap a single task vector in a list"):
        subspace_alignment(model(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a mapping"):
        subspace_alignment([model(0), 3])  # type: ignore[list-item]


def test_mismatched_task_vectors_reuse_the_engines_messages() -> None:
    a, b = model(0), model(1)
    del b["proj"]
    with pytest.raises(ValueError, match="different keys"):
        subspace_alignment([a, b])
    c = model(1)
    c["proj"] = torch.randn(6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="Key 'proj' has shape"):
        subspace_alignment([a, c])
    d = {k: v.float() for k, v in model(1).items()}
    with pytest.raises(ValueError, match="dtype"):
        subspace_alignment([a, d])
    x = TaskVector(model(0), {"name": "x", "base_fingerprint": "blake2b:aaa"})
    y = TaskVector(model(1), {"name": "y", "base_fingerprint": "blake2b:bbb"})
    with pytest.raises(ValueError, match="different pre-trained weights"):
        singular_spectra([x, y])


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.9", None])
def test_energy_outside_the_unit_interval(energy: object) -> None:
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        subspace_alignment(tasks(), energy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="energy must be"):
        key_alignment(torch.randn(2, 3, 3), energy)  # type: ignore[arg-type]


def test_no_matrix_keys_and_bad_key_requests() -> None:
    only_vectors = [{"b": torch.randn(4), "conv": torch.randn(2, 3, 2, 2)} for _ in range(2)]
    with pytest.raises(ValueError, match="No matrix keys selected"):
        subspace_alignment(only_vectors)
    with pytest.raises(ValueError, match="No matrix keys selected.*prefix='visual.'"):
        singular_spectra(tasks(), prefix="visual.")
    with pytest.raises(ValueError, match=r"not in the task vectors, e\.g\. \['nope'\]"):
        subspace_alignment(tasks(), keys=["proj", "nope"])
    with pytest.raises(ValueError, match="'transformer.resblocks.0.attn.in_proj_bias' .* is not a matrix key"):
        subspace_alignment(tasks(), keys=["transformer.resblocks.0.attn.in_proj_bias"])
    with pytest.raises(ValueError, match="'text_projection' .* is not a matrix key"):
        subspace_alignment(tasks(), keys="text_projection")


def test_other_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        subspace_alignment(tasks(), dtype=torch.float16)
    for top in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top must be a positive integer"):
            singular_spectra(tasks(), top=top)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[T, m, n\]"):
        key_alignment(torch.randn(3, 3))
    with pytest.raises(ValueError, match="floating-point"):
        key_alignment(torch.ones(2, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_key_and_the_file(bad: float, tmp_path: Path) -> None:
    broken = model(2)
    broken["transformer.resblocks.1.mlp.c_fc.weight"][3, 3] = bad
    path = TaskVector(broken, {"name": "d2"}).save(tmp_path / "d2.safetensors")
    tvs = [model(0), model(1), TaskVector.load(path)]
    with pytest.raises(ValueError, match=r"Key 'transformer.resblocks.1.mlp.c_fc.weight' of task 2 .*d2.safetensors"):
        subspace_alignment(tvs)


# --- documentation and layering -------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    attempted = 0
    for step in (analysis_module.keys, analysis_module.svd, analysis_module.alignment, analysis_module.spectra):
        result = doctest.testmod(step, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, step.__name__
        attempted += result.attempted
    assert attempted >= 4


def test_analysis_imports_no_lightning_or_open_clip() -> None:
    code = (
        "import sys, lightning_score.analysis; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'open_clip', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_keys_come_out_in_depth_order_whatever_the_input_order() -> None:
    g = torch.Generator().manual_seed(5)
    names = [f"transformer.resblocks.{b}.mlp.c_fc.weight" for b in range(12)]
    scrambled = [names[i] for i in (11, 2, 10, 0, 1, 9, 3, 8, 4, 7, 5, 6)]
    tv = {k: torch.randn(4, 3, generator=g, dtype=torch.float64) for k in scrambled}
    assert subspace_alignment([tv]).keys == names
    assert singular_spectra([tv]).keys == names
    vit = ["proj", "positional_embedding", "class_embedding", "conv1.weight", *scrambled, "ln_post.weight"]
    assert sorted(vit, key=depth_key) == [
        "class_embedding",
        "positional_embedding",
        *names,
        "conv1.weight",
        "ln_post.weight",
        "proj",
    ]
