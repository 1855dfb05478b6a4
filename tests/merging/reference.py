"""Float64 reference implementations written straight from ``shared/spec/merge-methods.md``.

Deliberately plain: one task and one entry at a time, full SVDs, Python loops for the statistics, no
code shared with the package. Every merged key is compared against these in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def polar(A: Tensor) -> Tensor:
    """polar(A) = P Qᵀ for the thin SVD A = P S Qᵀ (spec section 0)."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def shared_basis(deltas: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Steps 1-3 of SCORE / TSV-M: U⊥, V⊥ᵀ and the concatenated singular values s_cat."""
    T = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = r // T
    U_cat = torch.zeros(m, r, dtype=torch.float64)
    Vh_cat = torch.zeros(r, n, dtype=torch.float64)
    s_cat = torch.zeros(r, dtype=torch.float64)
    for t, delta in enumerate(deltas):
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        for j in range(k):
            U_cat[:, t * k + j] = U[:, j]
            Vh_cat[t * k + j, :] = Vh[j, :]
            s_cat[t * k + j] = S[j]
    return polar(U_cat), polar(Vh_cat), s_cat


def score(deltas: list[Tensor], variant: str = "trimmed", z: float = 1.96, divide_by_tasks: bool = True) -> Tensor:
    """SCORE, spec section 1, steps 1-7."""
    T = len(deltas)
    U_perp, Vh_perp, _ = shared_basis(deltas)
    r = U_perp.shape[1]
    total = torch.zeros(r, r, dtype=torch.float64)
    for delta in deltas:
        C = U_perp.T @ delta.double() @ Vh_perp.T
        off = C.clone()  # O_t
        for i in range(r):
            off[i, i] = 0.0
        values = off.flatten().tolist()
        mu = sum(values) / len(values)
        s = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
        h = z * s / T if divide_by_tasks else z * s
        trimmed = torch.zeros(r, r, dtype=torch.float64)
        diagonal = torch.zeros(r, r, dtype=torch.float64)
        for i in range(r):
            diagonal[i, i] = C[i, i]
            for j in range(r):
                if i != j and abs(off[i, j].item() - mu) <= h:
                    trimmed[i, j] = C[i, j]
        if variant == "trimmed":
            total += diagonal + trimmed
        elif variant == "diagonal":
            total += diagonal
        elif variant == "off_diagonal":
            total += trimmed
        elif variant == "full":
            total += C
        else:
            raise ValueError(variant)
    return U_perp @ total @ Vh_perp
