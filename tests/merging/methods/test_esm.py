"""ESM, the data-dependent method, with synthetic activations against a float64 reference of the formulas
of its authors' released code (Li, Qi, Tian, Geng, "Model Merging in the Essential Subspace").

Shapes: every target layer has input width n ≥ ⌊m/T⌋ and is fed N ≥ ⌊m/T⌋ rows, so that the kept directions
are true principal directions. When the feature shift X Δᵀ has rank below ⌊m/T⌋ (a ViT's ``mlp.c_fc`` with
T ≤ 3: rank ≤ 768 < 3072/T), ESM keeps directions of numerically zero eigenvalue with small non-zero weights
(λ/mean λ)^0.15: the result then carries the solver's rounding, in the authors' code as here.
"""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import merge_task_vectors
from lightning_score.merging.methods.esm import essential_subspace
from lightning_score.merging.methods.tsv import tsv_merge
from tests.merging import reference

D = 8


def _model(seed: int, blocks: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(100)
    out = {"positional_embedding": torch.randn(5, D, generator=g, dtype=torch.float64)}
    for b in range(blocks):
        for name, shape in [
            ("attn.in_proj_weight", (3 * D, 4 * D)),
            ("attn.out_proj.weight", (D, D)),
            ("mlp.c_fc.weight", (4 * D, 4 * D)),
            ("mlp.c_proj.weight", (D, 4 * D)),
            ("ln_1.weight", (D,)),
        ]:
            value = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
                *shape, generator=shared, dtype=torch.float64
            )
            out[f"transformer.resblocks.{b}.{name}"] = value
    return out  # fmt: skip


def _activations(tvs: list[dict[str, torch.Tensor]], rows: int = 40) -> list[dict[str, torch.Tensor]]:
    acts = []
    for t, tv in enumerate(tvs):
        g = torch.Generator().manual_seed(1000 + t)
        acts.append({
            key: torch.randn(rows, value.shape[1], generator=g, dtype=torch.float64)
            for key, value in tv.items() if key.endswith(("in_proj_weight", "c_fc.weight", "c_proj.weight"))
        })  # fmt: skip
    return acts


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("rows", [40, 20])  # N ≥ m everywhere; N < m for in_proj (m = 24) and c_fc (m = 32)
def test_matches_float64_reference(T: int, alpha: float, rows: int) -> None:
    if rows < 4 * D // T:
        pytest.skip("fewer proxy rows than kept directions: covered by test_too_few_proxy_rows")
    tvs = [_model(s) for s in range(T)]
    acts = _activations(tvs, rows)
    merged = merge_task_vectors(tvs, "esm", device="cpu", alpha=alpha, activations=acts)
    expected = reference.esm(tvs, acts, alpha=alpha)
    for key in expected:
        torch.testing.assert_close(
            merged[key], expected[key], rtol=0, atol=1e-10 * max(1.0, expected[key].abs().max().item()), msg=key
        )


@pytest.mark.parametrize("rows", [40, 20, 5])
def test_task_weight_uses_the_whole_basis_before_truncation(rows: int) -> None:
    """a_t = ‖P_tᵀΔ_t‖_F over all m directions: ‖Δ_t‖_F when N ≥ m, else with the standard-basis completion."""
    g = torch.Generator().manual_seed(rows)
    delta = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = torch.randn(rows, 32, generator=g, dtype=torch.float64)
    _, _, _, energy = essential_subspace(delta, x, rank=6)
    P, _ = reference.esm_basis(delta, x)
    assert energy.item() == pytest.approx(torch.linalg.norm(P.T @ delta).item(), rel=1e-12)
    truncated = torch.linalg.norm(P[:, :6].T @ delta).item()  # what a_t was before (the kept directions only)
    assert energy.item() > 1.05 * truncated
    if rows >= 24:
        assert energy.item() == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-12)
    else:  # the completion e_N, …, e_{m−1} is not orthogonal to the principal directions
        assert energy.item() != pytest.approx(torch.linalg.norm(delta).item(), rel=1e-6)


def test_out_proj_layers_are_rescaled_by_their_type() -> None:
    """attn.out_proj.weight is merged by TSV-M, then scaled by (its norm / the out_proj mean norm)²."""
    tvs = [_model(s, blocks=3) for s in range(2)]
    merged = merge_task_vectors(tvs, "esm", device="cpu", activations=_activations(tvs))
    keys = [f"transformer.resblocks.{b}.attn.out_proj.weight" for b in range(3)]
    plain = {k: tsv_merge(torch.stack([tv[k] for tv in tvs])) for k in keys}
    mean = sum(torch.linalg.norm(plain[k]) for k in keys) / 3
    for k in keys:
        factor = (torch.linalg.norm(plain[k]) / mean) ** 2
        assert abs(factor.item() - 1.0) > 1e-3  # the rescaling does something on these inputs
        torch.testing.assert_close(merged[k], factor * plain[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        merged["positional_embedding"], tsv_merge(torch.stack([tv["positional_embedding"] for tv in tvs]))
    )


def test_too_few_proxy_rows_warn_and_stay_finite(caplog: pytest.LogCaptureFixture) -> None:
    """N < ⌊m/T⌋: directions of eigenvalue 0 get weight 0; the result is finite and the user is told."""
    tvs = [_model(s, blocks=1) for s in range(2)]
    with caplog.at_level("WARNING", logger="lightning_score.merging.methods.esm"):
        merged = merge_task_vectors(tvs, "esm", device="cpu", activations=_activations(tvs, rows=5))
    assert "only 5 principal directions from 5 proxy rows" in caplog.text
    for key, value in merged.items():
        assert value.shape == tvs[0][key].shape and torch.isfinite(value).all(), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    """Low-precision task vectors come back in their dtype, computed in float32 to float32 accuracy."""
    tvs64 = [_model(s, blocks=1) for s in range(3)]
    acts = _activations(tvs64)
    tvs = [{k: v.to(dtype) for k, v in tv.items()} for tv in tvs64]
    merged = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    exact = merge_task_vectors(
        [{k: v.double() for k, v in tv.items()} for tv in tvs], "esm", device="cpu", activations=acts
    )
    for key, value in merged.items():
        assert value.dtype == dtype
        rel = (value.double() - exact[key]).norm() / exact[key].norm()
        assert rel < (2.0**-8 if dtype == torch.bfloat16 else 1e-4), (key, rel.item())


def test_identical_tasks_are_deterministic_and_finite() -> None:
    tv = _model(3, blocks=1)
    acts = _activations([tv])[0]
    first = merge_task_vectors([tv, tv, tv], "esm", device="cpu", activations=[acts] * 3)
    second = merge_task_vectors([tv, tv, tv], "esm", device="cpu", activations=[acts] * 3)
    for key in first:
        assert torch.equal(first[key], second[key]) and torch.isfinite(first[key]).all(), key


def test_alpha_scales_only_the_target_layers() -> None:
    tvs = [_model(s) for s in range(3)]
    acts = _activations(tvs)
    one = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    half = merge_task_vectors(tvs, "esm", device="cpu", alpha=0.5, activations=acts)
    for key in one:
        factor = 0.5 if key.endswith(("in_proj_weight", "c_fc.weight", "c_proj.weight")) else 1.0
        torch.testing.assert_close(half[key], factor * one[key], msg=key)


def test_the_data_matters() -> None:
    """Different proxy images give a different merge (ESM is data-dependent), the same ones the same merge."""
    tvs = [_model(s) for s in range(2)]
    acts = _activations(tvs)
    other = [
        {k: v @ torch.diag(torch.linspace(0.1, 3, v.shape[1], dtype=torch.float64)) for k, v in a.items()} for a in acts
    ]
    a = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    b = merge_task_vectors(tvs, "esm", device="cpu", activations=acts)
    c = merge_task_vectors(tvs, "esm", device="cpu", activations=other)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(a[key], b[key]) and not torch.allclose(a[key], c[key])
    # layers without activations are TSV-M merges, whatever the data
    key = "transformer.resblocks.0.attn.out_proj.weight"
    torch.testing.assert_close(a[key], c[key], rtol=0, atol=0)


def test_metadata_does_not_store_the_activations() -> None:
    tvs = [_model(s, blocks=1) for s in range(2)]
    merged = merge_task_vectors(tvs, "esm", device="cpu", activations=_activations(tvs))
    assert merged.metadata["merge"]["options"]["activations"] == "<list not recorded>"


def test_bad_activations() -> None:
    tvs = [_model(s, blocks=1) for s in range(2)]
    acts = _activations(tvs)
    with pytest.raises(ValueError, match="'esm' needs data: pass activations="):
        merge_task_vectors(tvs, "esm")
    with pytest.raises(ValueError, match=r"activations for 1 task\(s\) but 2 task vectors"):
        merge_task_vectors(tvs, "esm", activations=acts[:1])
    bad = [dict(acts[0]), dict(acts[1])]
    bad[1]["transformer.resblocks.0.mlp.c_fc.weight"] = torch.randn(10, D + 1, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"inputs of layer 'transformer.resblocks.0.mlp.c_fc.weight' for task 1 have shape \(10, 9\)"
    ):
        merge_task_vectors(tvs, "esm", activations=bad)
    with pytest.raises(ValueError, match="not matrix keys"):
        merge_task_vectors(tvs, "esm", activations=[{"nope": torch.zeros(2, 2)}] * 2)


def test_esm_is_never_split_across_processes() -> None:
    """Its layer-type scaling needs every target layer: the registry says so and the engine refuses a subset."""
    from lightning_score.merging import get_method

    assert get_method("esm").shardable is False and get_method("score").shardable is True
    tvs = [_model(s, blocks=1) for s in range(2)]
    with pytest.raises(ValueError, match="needs every key in one process"):
        merge_task_vectors(tvs, "esm", activations=_activations(tvs), keys=["positional_embedding"])
