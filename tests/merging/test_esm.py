"""ESM, the data-dependent method, with synthetic activations against the spec's float64 reference."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import merge_task_vectors
from tests.merging import reference

D = 8


def _model(seed: int, blocks: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(100)
    out = {"positional_embedding": torch.randn(5, D, generator=g, dtype=torch.float64)}
    for b in range(blocks):
        for name, shape in [
            ("attn.in_proj_weight", (3 * D, D)),
            ("attn.out_proj.weight", (D, D)),
            ("mlp.c_fc.weight", (4 * D, D)),
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


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_matches_float64_reference(T: int, alpha: float) -> None:
    tvs = [_model(s) for s in range(T)]
    acts = _activations(tvs)
    merged = merge_task_vectors(tvs, "esm", device="cpu", alpha=alpha, activations=acts)
    expected = reference.esm(tvs, acts, alpha=alpha)
    for key in expected:
        torch.testing.assert_close(
            merged[key], expected[key], rtol=0, atol=1e-10 * max(1.0, expected[key].abs().max().item()), msg=key
        )


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
