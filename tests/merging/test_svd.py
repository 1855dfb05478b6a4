"""svd: per-task singular triplets exactly as torch.linalg.svd gives them, a fixed sign convention, polar factors."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging.svd import canonicalize_signs, leading_triplets, polar, rank_budget, thin_svd


def _batch(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(3, 9, 4), (3, 4, 9), (2, 6, 6), (7, 5), (2, 3, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thin_svd_is_torch_svd_of_each_matrix_bit_for_bit(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    deltas = _batch(shape, dtype=dtype)
    U, S, Vh = thin_svd(deltas)
    r = min(shape[-2:])
    assert U.shape == (*shape[:-1], r) and S.shape == (*shape[:-2], r) and Vh.shape == (*shape[:-2], r, shape[-1])
    flat = deltas.reshape(-1, *shape[-2:])
    for index, matrix in enumerate(flat):
        expected = torch.linalg.svd(matrix, full_matrices=False)
        for got, want in zip((U, S, Vh), expected, strict=True):
            assert torch.equal(got.reshape(-1, *got.shape[len(shape) - 2 :])[index], want)


def test_canonical_signs_make_the_largest_entry_of_each_u_positive_and_keep_the_product() -> None:
    deltas = _batch((4, 8, 5), seed=1, dtype=torch.float64)
    U, S, Vh = thin_svd(deltas)
    Uc, Vhc = canonicalize_signs(U, Vh)
    largest = torch.gather(Uc, -2, Uc.abs().argmax(dim=-2, keepdim=True))
    assert bool((largest > 0).all())
    flipped = (Uc != U).any(dim=-2)  # per pair: u_i and v_i flip together, or neither does
    assert torch.equal(flipped, (Vhc != Vh).any(dim=-1)) and bool(flipped.any())
    assert torch.equal(Uc.abs(), U.abs()) and torch.equal(Vhc.abs(), Vh.abs())
    assert torch.equal((Uc * S.unsqueeze(-2)) @ Vhc, (U * S.unsqueeze(-2)) @ Vh)
    again, _ = canonicalize_signs(Uc, Vhc)
    assert torch.equal(again, Uc)  # already canonical: nothing flips


def test_canonical_signs_leave_a_zero_vector_as_it_is() -> None:
    U = torch.tensor([[0.0, -2.0], [0.0, 1.0]])
    Vh = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    Uc, Vhc = canonicalize_signs(U, Vh)
    assert torch.equal(Uc, torch.tensor([[0.0, 2.0], [0.0, -1.0]]))
    assert torch.equal(Vhc, torch.tensor([[1.0, 2.0], [-3.0, -4.0]]))


@pytest.mark.parametrize("sign_convention", ["svd", "canonical"])
def test_leading_triplets_are_the_first_k_of_the_thin_svd(sign_convention: str) -> None:
    deltas = _batch((3, 10, 6), seed=2)
    U, S, Vh = thin_svd(deltas)
    if sign_convention == "canonical":
        U, Vh = canonicalize_signs(U, Vh)
    Uk, Sk, Vhk = leading_triplets(deltas, 2, sign_convention)
    assert Uk.shape == (3, 10, 2) and Sk.shape == (3, 2) and Vhk.shape == (3, 2, 6)
    assert torch.equal(Uk, U[..., :2]) and torch.equal(Sk, S[..., :2]) and torch.equal(Vhk, Vh[..., :2, :])


def _nearest_orthonormal_float64(A: torch.Tensor) -> torch.Tensor:
    """A (AᵀA)^(-1/2) (tall) or (AAᵀ)^(-1/2) A (wide), in float64 through an eigendecomposition."""
    A = A.double()
    tall = A.shape[-2] >= A.shape[-1]
    gram = A.mT @ A if tall else A @ A.mT
    values, vectors = torch.linalg.eigh(gram)
    inverse_root = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.mT
    return A @ inverse_root if tall else inverse_root @ A


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5), (3, 8, 3)])
def test_polar_is_the_nearest_orthonormal_matrix(shape: tuple[int, ...]) -> None:
    A = _batch(shape, seed=3)
    P = polar(A)
    assert P.shape == A.shape and P.dtype == A.dtype
    tall = shape[-2] >= shape[-1]
    gram = P.mT @ P if tall else P @ P.mT
    eye = torch.eye(min(shape[-2:])).expand_as(gram)
    torch.testing.assert_close(gram, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(P.double(), _nearest_orthonormal_float64(A), rtol=0, atol=1e-5)
    other = polar(_batch(shape, seed=4))  # any other matrix with orthonormal columns (rows) is farther from A
    assert bool(((A - P).norm(dim=(-2, -1)) <= (A - other).norm(dim=(-2, -1))).all())


def test_polar_completes_zero_columns_with_orthonormal_ones() -> None:
    A = torch.zeros(6, 4, dtype=torch.float64)
    A[:, :2] = _batch((6, 2), seed=5, dtype=torch.float64)
    P = polar(A)
    torch.testing.assert_close(P.mT @ P, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "num_tasks", "expected"),
    [((768, 3072), 8, (768, 96)), ((3072, 768), 7, (768, 109)), ((5, 12), 8, (5, 0)), ((2, 12, 7), 1, (7, 7))],
)
def test_rank_budget(shape: tuple[int, ...], num_tasks: int, expected: tuple[int, int]) -> None:
    assert rank_budget(shape, num_tasks) == expected
    assert rank_budget(torch.Size(shape), num_tasks) == expected
