"""The effective rank and one key's alignment: the per-key linear algebra of the analysis."""

from __future__ import annotations

import torch

from lightning_score.analysis import effective_rank, subspace_alignment
from tests.analysis.reference import reference_matrix

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
