"""The baselines' defaults are their cited implementations' computations, on inputs where the alternatives differ.

Each known answer below is worked out by hand from the reference implementation's definition (docs/methods.md
names the repository, commit and function); the general float64 references are in tests/merging/
reference_baselines.py. Where an option keeps this package's earlier computation, its own answer is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_score.merging import get_method, merge_task_vectors
from tests.merging import reference_baselines


def _merge(tvs: list[dict[str, torch.Tensor]], method: str, **options: object) -> dict[str, torch.Tensor]:
    return dict(merge_task_vectors(tvs, method, device="cpu", compute_dtype=torch.float64, **options))


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- DARE-TIES: MergeLM's threshold rank int(P·0.8), where 0.2·P is not an integer ---------------------------


def test_dare_ties_keeps_mergelms_one_entry_more_where_a_fifth_of_p_is_no_integer() -> None:
    """P = 7: MergeLM's k = int(7·0.8) = 5 keeps three entries per task; TIES's k = 7 − int(1.4) = 6 keeps two."""
    tvs = [{"w": _f64(0.1, -0.7, 0.3, 0.5, -0.2, 0.6, 0.05)}, {"w": _f64(-0.4, 0.2, 0.35, -0.15, 0.25, -0.45, 0.55)}]
    mergelm = _merge(tvs, "dare_ties", drop_rate=0.0)["w"]
    torch.testing.assert_close(mergelm, _f64(-0.4, -0.7, 0.0, 0.5, 0.0, 0.6, 0.55), rtol=0, atol=1e-15)
    ties_rule = _merge(tvs, "dare_ties", drop_rate=0.0, threshold="ties")["w"]
    torch.testing.assert_close(ties_rule, _f64(0.0, -0.7, 0.0, 0.0, 0.0, 0.6, 0.55), rtol=0, atol=1e-15)
    assert torch.equal(ties_rule, _merge(tvs, "ties")["w"])  # the `ties` row keeps the SCORE authors' rule


@pytest.mark.parametrize("P", [7, 10, 13, 23])
def test_dare_ties_matches_mergelm_with_drops_on_models_of_any_size(P: int) -> None:
    g = torch.Generator().manual_seed(P)
    tvs = [{"a": torch.randn(P - 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g, dtype=torch.float64)}
           for _ in range(3)]  # fmt: skip
    for options in ({"drop_rate": 0.3, "seed": 2}, {"drop_rate": 0.0}):
        merged = _merge(tvs, "dare_ties", **options)
        expected = reference_baselines.dare_ties(tvs, **options)
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-12, msg=(P, options, key))
    assert get_method("dare_ties").defaults["threshold"] == "mergelm"


def test_dare_masks_of_the_first_tasks_do_not_depend_on_how_many_tasks_are_merged() -> None:
    """docs/methods.md used to say DARE's draws depend on T: the first tasks' masks are the same at T = 3 and 4."""
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(20, 16, generator=g, dtype=torch.float64)} for _ in range(4)]
    mask = {}
    for count in (3, 4):
        for t in range(3):  # task t alone among `count` zero-padded tasks: its survivors only
            alone = [
                tv if i == t else {"w": torch.zeros(20, 16, dtype=torch.float64)} for i, tv in enumerate(tvs[:count])
            ]
            mask[(count, t)] = _merge(alone, "dare_ta", seed=1, drop_rate=0.5)["w"] != 0
    assert all(torch.equal(mask[(3, t)], mask[(4, t)]) for t in range(3))
    assert not torch.equal(mask[(3, 0)], mask[(3, 1)])  # each task its own draws


# --- Model Breadcrumbs: per row along the last dimension ----------------------------------------------------


def test_breadcrumbs_masks_per_row_as_the_authors_code() -> None:
    """keep 0.4, drop_top 0.2 on [[10..6], [5..1]]: per row of 5, remove 1 and keep 2; per layer of 10, 2 and 4."""
    tvs = [{"w": torch.tensor([[10.0, 9, 8, 7, 6], [5, 4, 3, 2, 1]], dtype=torch.float64)}]
    row = _merge(tvs, "breadcrumbs", keep=0.4, drop_top=0.2)["w"]
    assert row.tolist() == [[0.0, 9.0, 8.0, 0.0, 0.0], [0.0, 4.0, 3.0, 0.0, 0.0]]
    layer = _merge(tvs, "breadcrumbs", keep=0.4, drop_top=0.2, granularity="layer")["w"]
    assert layer.tolist() == [[0.0, 0.0, 8.0, 7.0, 6.0], [5.0, 0.0, 0.0, 0.0, 0.0]]


def test_breadcrumbs_leaves_a_scalar_key_as_it_is_and_ranks_a_vector_as_one_row() -> None:
    tvs = [
        {"s": _f64(3.0).reshape(()), "v": _f64(5, 4, 3, 2, 1)},
        {"s": _f64(1.0).reshape(()), "v": _f64(1, 2, 3, 4, 5)},
    ]
    merged = _merge(tvs, "breadcrumbs", keep=0.4, drop_top=0.2)
    assert merged["s"].item() == 4.0  # no mask on a 0-d key: the sum
    assert merged["v"].tolist() == [0.0, 4.0, 3.0 + 3.0, 4.0, 0.0]  # (0, 4, 3, 0, 0) + (0, 0, 3, 4, 0)


# --- Model Stock: the cosine of the mean pairwise angle (FusionBench), with its ε -----------------------------


def test_model_stock_takes_the_mean_angle_with_unequal_angles() -> None:
    """τ = (1, 0), (1, 0), (0, 1): angles 0°, 90°, 90°, mean 60°, t = 3·0.5/(2·0.5 + 1) = 0.75; the mean of the
    cosines (1, 0, 0) is 1/3 and gives t = 0.6."""
    tvs = [{"w": _f64(1.0, 0.0)}, {"w": _f64(1.0, 0.0)}, {"w": _f64(0.0, 1.0)}]
    mean = _f64(2 / 3, 1 / 3)
    torch.testing.assert_close(_merge(tvs, "model_stock", eps=0.0)["w"], 0.75 * mean, rtol=0, atol=1e-14)
    cosine = _merge(tvs, "model_stock", angle="mean_cosine", eps=0.0)["w"]
    torch.testing.assert_close(cosine, 0.6 * mean, rtol=0, atol=1e-14)
    default = _merge(tvs, "model_stock")["w"]  # with ε = 1e-8: arccos(1/(1 + 1e-8)) is 1.4e-4 rad, not 0
    angle = (math.acos(1 / (1 + 1e-8)) + math.pi) / 3
    t = 3 * math.cos(angle) / (2 * math.cos(angle) + 1 + 1e-8)
    torch.testing.assert_close(default, t * mean, rtol=0, atol=1e-12)
    assert abs(t - 0.75) > 1e-5


@pytest.mark.parametrize("T", [2, 3, 4, 5])
def test_model_stock_matches_fusionbench_on_random_updates(T: int) -> None:
    g = torch.Generator().manual_seed(T)
    tvs = [{"w": torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.8, "b": torch.randn(5, generator=g,
            dtype=torch.float64) * 1e-3} for _ in range(T)]  # fmt: skip
    merged = _merge(tvs, "model_stock")
    expected = reference_baselines.model_stock(tvs)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-12, atol=1e-15, msg=key)


# --- WUDI: every key but the blocks' linear layers keeps θ₀ --------------------------------------------------


def test_wudi_leaves_every_other_key_at_the_pre_trained_weights() -> None:
    g = torch.Generator().manual_seed(3)

    def task() -> dict[str, torch.Tensor]:
        return {"transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g, dtype=torch.float64),
                "transformer.resblocks.0.attn.in_proj_bias": torch.randn(12, generator=g, dtype=torch.float64),
                "positional_embedding": torch.randn(5, 4, generator=g, dtype=torch.float64),
                "proj": torch.randn(4, 3, generator=g, dtype=torch.float64),
                "ln_pre.weight": torch.randn(4, generator=g, dtype=torch.float64)}  # fmt: skip

    tvs = [task() for _ in range(3)]
    solved = "transformer.resblocks.0.attn.in_proj_weight"
    authors = _merge(tvs, "wudi", iterations=20, lr=1e-2)
    for key in ("transformer.resblocks.0.attn.in_proj_bias", "positional_embedding", "proj", "ln_pre.weight"):
        assert torch.equal(authors[key], torch.zeros_like(tvs[0][key])), key
    mean = _merge(tvs, "wudi", iterations=20, lr=1e-2, other_keys="mean")
    fusion_bench = _merge(tvs, "wudi", iterations=20, lr=1e-2, other_keys="mean", all_matrices=True)
    for key in ("transformer.resblocks.0.attn.in_proj_bias", "ln_pre.weight"):
        torch.testing.assert_close(mean[key], sum(tv[key] for tv in tvs) / 3, rtol=0, atol=1e-15)
    torch.testing.assert_close(mean["proj"], sum(tv["proj"] for tv in tvs) / 3, rtol=0, atol=1e-15)
    assert not torch.allclose(fusion_bench["proj"], mean["proj"])  # solved, not averaged
    assert torch.equal(authors[solved], mean[solved]) and torch.equal(authors[solved], fusion_bench[solved])
    expected = reference_baselines.wudi(tvs, iterations=20, lr=1e-2, all_matrices=True, other_keys="mean")
    torch.testing.assert_close(fusion_bench["proj"], expected["proj"], rtol=0, atol=1e-10)


# --- Fisher merging: normalised by each Fisher's norm, only the first model floored ----------------------------


def test_fisher_defaults_normalise_and_floor_only_the_first_model() -> None:
    """τ₀ = 1, τ₁ = −1 on three entries; F₀ = (1, 0, 0) (norm 1), F₁ = (100, 100, 0) (norm 141.4), λ = ½ each:
    entry 0 weighs ½·1 against ½/141.4·100, entry 1 floors only F₀ (1e-6) against 100·½/141.4, entry 2 has only
    the floored first model. Without normalisation and with every model floored: (−0.980, −1, 0)."""
    tvs = [{"w": _f64(1, 1, 1)}, {"w": _f64(-1, -1, -1)}]
    fishers = [{"w": _f64(1, 0, 0)}, {"w": _f64(100, 100, 0)}]
    n1 = math.sqrt(2) * 100
    w0, w1 = 0.5, 0.5 / n1 * 100
    e1 = (0.5 * 1e-6 - w1) / (0.5 * 1e-6 + w1)
    expected = _f64((w0 - w1) / (w0 + w1), e1, 1.0)
    merged = _merge(tvs, "fisher", fishers=fishers)["w"]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    assert abs(merged[0].item() - 0.1716) < 1e-4 and merged[2].item() == 1.0
    plain = _merge(tvs, "fisher", fishers=fishers, normalize_fishers=False, favor_first_model=False)["w"]
    torch.testing.assert_close(plain, _f64((1 - 100) / 101, (1e-6 - 100) / (1e-6 + 100), 0.0), rtol=0, atol=1e-12)
    reference = reference_baselines.fisher(tvs, fishers)
    torch.testing.assert_close(merged, reference["w"], rtol=0, atol=1e-12)


def test_fisher_of_a_model_whose_whole_fisher_is_zero_keeps_the_equal_weight() -> None:
    """The reference divides by the zero norm; here that model keeps λ = 1/T (and, not floored, weighs nothing)."""
    tvs = [{"w": _f64(1, 2)}, {"w": _f64(3, 4)}]
    merged = _merge(tvs, "fisher", fishers=[{"w": _f64(2, 0)}, {"w": _f64(0, 0)}])["w"]
    torch.testing.assert_close(merged, _f64(1, 2), rtol=0, atol=1e-15)  # only the first model has weight
