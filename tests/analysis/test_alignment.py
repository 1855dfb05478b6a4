"""The Subspace Alignment Ratio against the float64 reference: known answers, streaming, dtypes, properties."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_score import TaskVector
from lightning_score.analysis import (
    key_alignment,
    singular_spectra,
    subspace_alignment,
)
from tests.analysis.reference import (
    MATRIX_KEYS,
    decaying,
    model,
    orthonormal,
    reference_matrix,
    reference_rank,
    tasks,
)

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


def test_analysis_imports_no_lightning_or_open_clip() -> None:
    code = (
        "import sys, lightning_score.analysis; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'open_clip', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
