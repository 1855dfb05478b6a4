"""merging.low_rank: the thin SVD of s·B·A from its factors, against the dense update's SVD in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging.low_rank import LowRankUpdate, factor_svd


def _update(m: int, n: int, rho: int, scale: float = 1.0, seed: int = 0, dtype=torch.float64) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(
        torch.randn(m, rho, generator=g, dtype=dtype), torch.randn(rho, n, generator=g, dtype=dtype), scale
    )


@pytest.mark.parametrize(("m", "n", "rho"), [(40, 30, 4), (30, 40, 4), (17, 64, 16), (5, 8, 7), (8, 5, 7), (6, 6, 6)])
def test_the_factor_svd_is_a_thin_svd_of_the_dense_update(m, n, rho):
    update = _update(m, n, rho, scale=0.75)
    dense = update.dense()
    U, S, Vh = factor_svd(update)
    c = min(rho, m, n)
    assert U.shape == (m, c) and S.shape == (c,) and Vh.shape == (c, n)
    reference = torch.linalg.svdvals(dense)[:c]
    torch.testing.assert_close(S, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(U.mT @ U, torch.eye(c, dtype=U.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.mT, torch.eye(c, dtype=U.dtype), rtol=0, atol=1e-12)


def test_distinct_singular_vectors_match_the_dense_ones_up_to_sign():
    update = _update(30, 20, 5, seed=3)
    U, _S, Vh = factor_svd(update)
    U_ref, _S_ref, Vh_ref = torch.linalg.svd(update.dense(), full_matrices=False)
    signs = torch.sign((U * U_ref[:, :5]).sum(0))
    torch.testing.assert_close(U * signs, U_ref[:, :5], rtol=0, atol=1e-10)
    torch.testing.assert_close(Vh * signs[:, None], Vh_ref[:5], rtol=0, atol=1e-10)


def test_rank_deficient_factors_give_exact_zero_singular_values():
    update = _update(20, 15, 4)
    B = update.B.clone()
    B[:, 3] = B[:, 0]  # two equal columns: rank 3
    S = factor_svd(LowRankUpdate(B, update.A, 1.0))[1]
    assert S[:3].min() > 1e-3
    assert S[3].abs() < 1e-12


def test_a_zero_update_has_zero_singular_values_and_still_orthonormal_factors():
    U, S, _Vh = factor_svd(
        LowRankUpdate(torch.randn(9, 2, dtype=torch.float64), torch.zeros(2, 7, dtype=torch.float64))
    )
    assert torch.count_nonzero(S) == 0
    torch.testing.assert_close(U.mT @ U, torch.eye(2, dtype=U.dtype), rtol=0, atol=1e-12)


def test_float32_factors_agree_with_the_float64_reference():
    update64 = _update(64, 48, 8, scale=2.0, seed=1)
    update32 = LowRankUpdate(update64.B.float(), update64.A.float(), 2.0)
    U, S, Vh = factor_svd(update32)
    assert S.dtype == torch.float32
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(update64.dense())[:8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((U @ torch.diag(S) @ Vh).double(), update64.dense(), rtol=1e-5, atol=1e-4)


def test_the_scale_multiplies_the_singular_values_only():
    base = _update(12, 10, 3, scale=1.0, seed=2)
    U1, S1, Vh1 = factor_svd(base)
    U2, S2, Vh2 = factor_svd(LowRankUpdate(base.B, base.A, 3.0))
    torch.testing.assert_close(S2, 3.0 * S1, rtol=1e-12, atol=0)
    torch.testing.assert_close(U2 @ torch.diag(S2) @ Vh2, 3.0 * (U1 @ torch.diag(S1) @ Vh1), rtol=1e-12, atol=1e-12)


def test_factors_of_mismatched_inner_dimensions_are_refused():
    with pytest.raises(ValueError, match=r"B \[m, ρ\] and A \[ρ, n\].*\(4, 2\).*\(3, 5\)"):
        LowRankUpdate(torch.zeros(4, 2), torch.zeros(3, 5))
