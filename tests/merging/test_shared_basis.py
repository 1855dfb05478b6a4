"""shared_basis: the concatenation of each task's leading triplets and its polar factors (SCORE's steps 1-3)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import pytest
import torch

from lightning_score.merging.shared_basis import concatenate_leading, shared_orthogonal_basis
from lightning_score.merging.svd import leading_triplets, polar


def _deltas(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_task_t_fills_slots_t_k_to_t_k_plus_k_and_the_rest_is_zero() -> None:
    T, m, q, n, k = 3, 8, 4, 7, 2  # r = 7 slots, T·k = 6 used
    U, S, Vh = _deltas((T, m, q)), _deltas((T, q), 1), _deltas((T, q, n), 2)
    U_cat, s_cat, Vh_cat = concatenate_leading(U, S, Vh, k)
    assert U_cat.shape == (m, 7) and s_cat.shape == (7,) and Vh_cat.shape == (7, n)
    for t in range(T):
        assert torch.equal(U_cat[:, t * k : (t + 1) * k], U[t, :, :k])
        assert torch.equal(s_cat[t * k : (t + 1) * k], S[t, :k])
        assert torch.equal(Vh_cat[t * k : (t + 1) * k], Vh[t, :k])
    assert not U_cat[:, 6:].any() and not s_cat[6:].any() and not Vh_cat[6:].any()


@pytest.mark.parametrize(("shape", "sign_convention"), [((3, 9, 7), "svd"), ((2, 5, 8), "canonical")])
def test_the_basis_is_the_polar_factors_of_the_concatenation(shape: tuple[int, ...], sign_convention: str) -> None:
    deltas = _deltas(shape, 3)
    r, k = min(shape[1:]), min(shape[1:]) // shape[0]
    U_perp, s_cat, Vh_perp = shared_orthogonal_basis(deltas, sign_convention)
    U_cat, expected_s, Vh_cat = concatenate_leading(*leading_triplets(deltas, k, sign_convention), k)
    assert torch.equal(U_perp, polar(U_cat)) and torch.equal(s_cat, expected_s) and torch.equal(Vh_perp, polar(Vh_cat))
    torch.testing.assert_close(U_perp.mT @ U_perp, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh_perp @ Vh_perp.mT, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)


class _Factors:
    """Factorizations that record what the basis asks of them."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def leading(self, deltas: torch.Tensor, k: int, sign_convention: str = "svd") -> Any:
        self.asked.append(("leading", (k, sign_convention)))
        return leading_triplets(deltas, k, sign_convention)

    def reuse(self, deltas: torch.Tensor, name: Hashable, compute: Callable[[], Any]) -> Any:
        self.asked.append(("reuse", name))
        return compute()


def test_with_factorizations_the_basis_is_reused_by_name_and_the_same() -> None:
    deltas, factors = _deltas((3, 9, 7), 4), _Factors()
    got = shared_orthogonal_basis(deltas, "canonical", factors=factors)
    assert factors.asked == [("reuse", ("shared_basis", "canonical")), ("leading", (2, "canonical"))]
    for part, expected in zip(got, shared_orthogonal_basis(deltas, "canonical"), strict=True):
        assert torch.equal(part, expected)
