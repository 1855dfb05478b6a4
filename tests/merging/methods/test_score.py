"""SCORE against the float64 reference of the spec, plus its properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_score.merging import merge_task_vectors
from lightning_score.merging.methods.score import VARIANTS, score_merge
from lightning_score.merging.shared_basis import shared_orthogonal_basis
from tests.merging import reference

# (m, n, T) with T dividing r = min(m, n): square, tall and wide, T = 2..5.
DIVISIBLE = [
    (12, 12, 2), (12, 12, 3), (12, 12, 4), (20, 20, 5),
    (24, 12, 2), (30, 12, 3), (28, 16, 4), (40, 15, 5),
    (12, 24, 2), (12, 30, 3), (16, 28, 4), (15, 40, 5),
]  # fmt: skip


def _tasks(m: int, n: int, T: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return [(0.5 * shared + torch.randn(m, n, generator=generator, dtype=torch.float64)).to(dtype) for _ in range(T)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("m", "n", "T"), DIVISIBLE)
def test_matches_float64_reference(m: int, n: int, T: int, variant: str) -> None:
    deltas = _tasks(m, n, T, seed=m * 100 + n * 10 + T)
    expected = reference.score(deltas, variant=variant)
    merged = score_merge(torch.stack(deltas), variant=variant)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-10 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize(("z", "divide_by_tasks"), [(1.0, True), (1.96, False), (0.0, True), (3.5, True)])
def test_threshold_options_match_reference(z: float, divide_by_tasks: bool) -> None:
    deltas = _tasks(18, 12, 3, seed=5)
    expected = reference.score(deltas, z=z, divide_by_tasks=divide_by_tasks)
    merged = score_merge(torch.stack(deltas), z=z, divide_by_tasks=divide_by_tasks)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-10)


def test_variants_differ_and_full_is_the_sum_of_projections() -> None:
    deltas = torch.stack(_tasks(16, 16, 4, seed=3))
    results = {variant: score_merge(deltas, variant=variant) for variant in VARIANTS}
    # trimmed = diagonal + off_diagonal, exactly as the ablation table splits it
    torch.testing.assert_close(results["trimmed"], results["diagonal"] + results["off_diagonal"], rtol=0, atol=1e-12)
    # full keeps every coefficient: with a square basis it is the plain sum (the released code's bug adds 1s)
    torch.testing.assert_close(results["full"], deltas.sum(0), rtol=0, atol=1e-10)
    assert not torch.allclose(results["trimmed"], results["full"])


def test_trimming_removes_large_couplings_not_small_ones() -> None:
    """Steps 5-6 on coefficients built by hand: a large coupling is dropped, the diagonal always stays."""
    from lightning_score.merging.methods.score import aggregate, trim_mask

    generator = torch.Generator().manual_seed(3)
    C = 0.1 * torch.randn(2, 20, 20, generator=generator, dtype=torch.float64)
    C[:, range(20), range(20)] = 40.0  # a huge diagonal never counts in the statistics (it is zeroed)
    C[0, 3, 7] = 5.0  # one large coupling in task 0
    keep = trim_mask(C, z=1.96, divide_by_tasks=True)
    assert not keep[0, 3, 7] and not keep.diagonal(dim1=-2, dim2=-1).any()
    assert keep.float().mean() > 0.5  # most small couplings stay: this is not a top-k rule
    sigma = aggregate(C, "trimmed", z=1.96, divide_by_tasks=True)
    torch.testing.assert_close(sigma[3, 7], C[1, 3, 7] * keep[1, 3, 7])
    torch.testing.assert_close(torch.diagonal(sigma), torch.full((20,), 80.0, dtype=torch.float64))
    # without dividing by T the band is twice as wide, so more entries are kept
    assert trim_mask(C, 1.96, divide_by_tasks=False).sum() > keep.sum()


def test_identical_task_vectors_are_deterministic() -> None:
    delta = _tasks(24, 16, 1, seed=2)[0]
    tvs = [{"w": delta.clone()} for _ in range(4)]
    first = merge_task_vectors(tvs, device="cpu")["w"]
    second = merge_task_vectors(tvs, device="cpu")["w"]
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()


def test_one_task_gives_back_the_task() -> None:
    """T = 1: k = r, the basis spans Δ's row and column spaces, and only the trim changes anything."""
    delta = _tasks(14, 10, 1, seed=4)[0]
    torch.testing.assert_close(score_merge(delta[None], variant="full"), delta, rtol=0, atol=1e-10)
    torch.testing.assert_close(score_merge(delta[None]), reference.score([delta]), rtol=0, atol=1e-10)
    # in Δ's own singular basis C is diagonal, so nothing is trimmed
    torch.testing.assert_close(score_merge(delta[None]), delta, rtol=0, atol=1e-10)


def test_orthogonal_tasks_are_kept_whole() -> None:
    """Tasks living in mutually orthogonal subspaces have no conflicts: SCORE returns their sum."""
    m, n, T, rank = 24, 24, 3, 8
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    deltas = torch.stack(
        [U[:, t * rank : (t + 1) * rank] @ torch.diag(torch.linspace(3, 1, rank, dtype=torch.float64))
         @ V[:, t * rank : (t + 1) * rank].T for t in range(T)]
    )  # fmt: skip
    torch.testing.assert_close(score_merge(deltas), deltas.sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("m", "n"), [(30, 12), (12, 30)])
def test_output_lies_in_the_span_of_the_shared_basis(m: int, n: int, variant: str) -> None:
    deltas = torch.stack(_tasks(m, n, 3, seed=9))
    U, _, Vh = shared_orthogonal_basis(deltas)
    merged = score_merge(deltas, variant=variant)
    outside_columns = merged - U @ (U.mT @ merged)
    outside_rows = merged - (merged @ Vh.mT) @ Vh
    assert outside_columns.abs().max() < 1e-10 and outside_rows.abs().max() < 1e-10
    # and the span is a proper subspace on the long side: a generic matrix is not in it
    probe = torch.randn(m, n, dtype=torch.float64)
    assert (probe - U @ (U.mT @ probe) @ Vh.mT @ Vh).norm() > 0.1 * probe.norm()


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(min_value=3, max_value=24),
    n=st.integers(min_value=3, max_value=24),
    T=st.integers(min_value=2, max_value=5),
    variant=st.sampled_from(VARIANTS),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_properties_when_T_does_not_divide_r(m: int, n: int, T: int, variant: str, seed: int) -> None:
    deltas = torch.stack(_tasks(m, n, T, seed=seed))
    first = score_merge(deltas, variant=variant)
    assert first.shape == (m, n) and first.dtype == torch.float64
    assert torch.isfinite(first).all()
    assert torch.equal(first, score_merge(deltas, variant=variant))
    if variant == "full" and min(m, n) % T == 0:
        torch.testing.assert_close(first, reference.score(list(deltas), variant="full"), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_their_dtype_on_cpu(dtype: torch.dtype) -> None:
    deltas = _tasks(24, 12, 3, seed=1)
    tvs = [{"w": d.to(dtype), "b": d[0].to(dtype)} for d in deltas]
    merged = merge_task_vectors(tvs, device="cpu")
    assert merged["w"].dtype == dtype and merged["w"].device.type == "cpu"
    expected = reference.score([d.to(dtype).double() for d in deltas])
    # computed in float32: the result is the float64 one up to float32 and storage rounding (no trim flips here)
    rel = (merged["w"].double() - expected).norm() / expected.norm()
    assert rel < {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


def test_trimmed_result_depends_on_svd_signs_unless_canonical(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another solver may return singular pairs with other joint signs. The trim's mean is not invariant to
    that (the spec's reference keeps torch.linalg.svd's signs); the canonical convention removes it."""
    from lightning_score.merging import svd

    deltas = torch.stack(_tasks(16, 16, 2, seed=21))
    defaults = {c: score_merge(deltas, sign_convention=c) for c in ("svd", "canonical")}
    flip = torch.where(torch.rand(2, 1, 16, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0).double()

    def flipped_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, S, Vh = torch.linalg.svd(x, full_matrices=False)
        return U * flip, S, Vh * flip.mT

    monkeypatch.setattr(svd, "thin_svd", flipped_svd)  # what leading_triplets calls
    flipped = {c: score_merge(deltas, sign_convention=c) for c in ("svd", "canonical")}
    torch.testing.assert_close(flipped["canonical"], defaults["canonical"], rtol=0, atol=1e-12)
    assert (flipped["svd"] - defaults["svd"]).norm() > 1e-3 * defaults["svd"].norm()
    # the sign-free variants do not care
    for variant in ("diagonal", "full"):
        torch.testing.assert_close(
            score_merge(deltas, variant=variant), reference.score(list(deltas), variant), rtol=0, atol=1e-10
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_and_cuda_agree(variant: str) -> None:
    deltas = _tasks(96, 48, 3, seed=8)
    tvs = [{"w": d} for d in deltas]
    cpu = merge_task_vectors(tvs, device="cpu", variant=variant, sign_convention="canonical")["w"]
    cuda = merge_task_vectors(tvs, device="cuda", variant=variant, sign_convention="canonical")["w"]
    torch.testing.assert_close(cuda, cpu, rtol=0, atol=1e-9 * cpu.abs().max().item())
