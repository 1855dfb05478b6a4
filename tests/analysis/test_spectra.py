"""Singular spectra against the float64 reference, and the results' JSON round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_score.analysis import (
    SingularSpectra,
    SubspaceAlignment,
    singular_spectra,
    subspace_alignment,
)
from tests.analysis.reference import MATRIX_KEYS, reference_rank, tasks

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
