"""The shared test matrix: every registered data-free method against a float64 reference written from its
paper, plus shapes, dtypes, T = 1..5, identical task vectors, determinism, sharding, devices and bad options."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import get_method, list_methods, merge_task_vectors
from tests.merging import reference

DATA_FREE = [name for name in list_methods() if not get_method(name).needs_data]
EXPECTED = {
    "score", "tsv", "iso_c", "iso_cts", "ties", "magmax", "pcb", "task_arithmetic", "average",
    "dare_ta", "dare_ties", "breadcrumbs", "randmix", "model_stock", "cart", "wudi", "regmean", "fisher", "knots",
}  # fmt: skip
SEEDED = ["dare_ta", "dare_ties", "randmix"]


def _model(seed: int, r: int = 12, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A small "image tower": a block's square, tall and wide linear layers (T | r for T = 2, 3, 4 with
    r = 12), a matrix that is not a linear layer, and non-matrix keys."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(999)

    def make(*shape: int) -> torch.Tensor:  # correlated across tasks, so the methods disagree with the mean
        return (torch.randn(*shape, generator=g) + 0.7 * torch.randn(*shape, generator=shared)).to(dtype)

    return {
        "blocks.0.attn.out_proj.weight": make(r, r),
        "blocks.0.mlp.c_fc.weight": make(3 * r, r),
        "blocks.0.mlp.c_proj.weight": make(r, 2 * r),
        "positional_embedding": make(2 * r, r),
        "blocks.0.attn.out_proj.bias": make(r),
        "conv.weight": make(4, 3, 2, 2),
        "text_projection": make(r, r // 2),
    }


def test_every_method_is_registered_with_a_reference() -> None:
    assert set(list_methods()) >= EXPECTED
    for name in list_methods():
        spec = get_method(name)
        assert len(spec.reference) > 30 and "," in spec.reference, name  # authors, title, venue
        assert spec.summary and spec.summary != name


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("method", DATA_FREE)
def test_matches_float64_reference(method: str, T: int) -> None:
    tvs = [_model(seed) for seed in range(T)]
    expected = reference.merge_model(tvs, method)
    merged = merge_task_vectors(tvs, method, device="cpu")
    assert sorted(merged) == sorted(expected)
    for key in expected:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-10 * scale, msg=f"{method} {key}")


OPTIONS = {
    "ties": {"density": 0.55},
    "pcb": {"ratio": 0.3, "clip": 0.1},
    "iso_cts": {"common_fraction": 0.5},
    "dare_ta": {"drop_rate": 0.3, "seed": 5},
    "dare_ties": {"drop_rate": 0.5, "density": 0.6, "seed": 3},
    "breadcrumbs": {"keep": 0.5, "drop_top": 0.1},
    "randmix": {"seed": 11},
    "cart": {"rank_ratio": 0.3, "coefficient": 0.7},
    "wudi": {"iterations": 40, "lr": 1e-2},
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_options_match_reference(method: str) -> None:
    options = OPTIONS[method]
    tvs = [_model(seed) for seed in range(3)]
    expected = reference.merge_model(tvs, method, **options)
    merged = merge_task_vectors(tvs, method, device="cpu", **options)
    for key in expected:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-10 * scale, msg=key)
    default = merge_task_vectors(tvs, method, device="cpu")
    key = "blocks.0.attn.out_proj.weight"
    assert not torch.allclose(default[key], merged[key])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("breadcrumbs", {"granularity": "row"}),
        ("breadcrumbs", {"granularity": "row", "keep": 0.4, "drop_top": 0.2}),
        ("breadcrumbs", {"granularity": "layer"}),
        ("breadcrumbs", {"granularity": "layer", "keep": 0.4, "drop_top": 0.2}),
        ("cart", {"all_matrices": True}),
        ("wudi", {"all_matrices": True, "iterations": 20, "lr": 1e-2}),
        ("wudi", {"other_keys": "mean", "iterations": 20, "lr": 1e-2}),
        ("wudi", {"all_matrices": True, "other_keys": "mean", "iterations": 20, "lr": 1e-2}),  # FusionBench's
        ("model_stock", {"angle": "mean_cosine", "eps": 0.0}),
        ("model_stock", {"angle": "mean_cosine"}),
        ("model_stock", {"eps": 0.0}),
        ("dare_ta", {"drop_rate": 0.0}),
        ("dare_ties", {"threshold": "ties"}),
        ("dare_ties", {"threshold": "ties", "drop_rate": 0.3, "density": 0.45}),
        ("dare_ties", {"drop_rate": 0.3, "density": 0.45}),
    ],
)
def test_variants_match_reference(method: str, options: dict) -> None:
    tvs = [_model(seed) for seed in range(3)]
    expected = reference.merge_model(tvs, method, **options)
    merged = merge_task_vectors(tvs, method, device="cpu", **options)
    for key in expected:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-10 * scale, msg=key)


@pytest.mark.parametrize("T", [5])
@pytest.mark.parametrize("method", DATA_FREE)
def test_five_tasks_match_reference(method: str, T: int) -> None:
    tvs = [_model(seed, r=10) for seed in range(T)]  # r = 10: T = 5 divides it
    expected = reference.merge_model(tvs, method)
    merged = merge_task_vectors(tvs, method, device="cpu")
    for key in expected:
        torch.testing.assert_close(
            merged[key], expected[key], rtol=0, atol=1e-10 * max(1.0, expected[key].abs().max().item())
        )


@pytest.mark.parametrize("method", DATA_FREE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(method: str, dtype: torch.dtype) -> None:
    """Inputs in low precision come back in their dtype, computed in float32 to float32 accuracy."""
    tvs = [_model(seed, dtype=dtype) for seed in range(3)]
    # SCORE's trim depends on the singular vectors' signs, which float32 and float64 solvers pick differently
    options = {"sign_convention": "canonical"} if method == "score" else {}
    merged = merge_task_vectors(tvs, method, device="cpu", **options)
    exact = merge_task_vectors([{k: v.double() for k, v in tv.items()} for tv in tvs], method, device="cpu", **options)
    for key, value in merged.items():
        assert value.dtype == dtype and value.device.type == "cpu" and value.shape == tvs[0][key].shape
        assert torch.isfinite(value.float()).all()
        rel = (value.double() - exact[key]).norm() / exact[key].norm().clamp_min(1e-12)
        rounding = 2.0**-8 if dtype == torch.bfloat16 else 1e-5  # bfloat16 keeps 8 significant bits
        assert rel < rounding, (key, rel.item())


@pytest.mark.parametrize("method", DATA_FREE)
def test_identical_task_vectors_are_deterministic_and_finite(method: str) -> None:
    tv = _model(7)
    tvs = [dict(tv) for _ in range(3)]
    first = merge_task_vectors(tvs, method, device="cpu")
    second = merge_task_vectors(tvs, method, device="cpu")
    for key in first:
        assert torch.equal(first[key], second[key]) and torch.isfinite(first[key]).all()


@pytest.mark.parametrize(
    ("method", "factor", "options"),
    [("average", 1.0, {}), ("task_arithmetic", 3.0, {}), ("magmax", 1.0, {}), ("iso_c", None, {}),
     ("model_stock", 1.0, {"eps": 0.0}), ("model_stock", 1.0, {"eps": 0.0, "angle": "mean_cosine"}),
     ("cart", 1.0, {}), ("randmix", 1.0, {}), ("dare_ta", None, {})],
)  # fmt: skip
def test_identical_task_vectors_known_answers(method: str, factor: float | None, options: dict) -> None:
    """(Model Stock without its ε: with ε = 1e-8 the cosine of identical updates is a little below 1, see
    test_model_stock_shrinks_tiny_updates_by_its_epsilon.)"""
    tv = _model(3)
    merged = merge_task_vectors([tv, tv, tv], method, device="cpu", **options)
    if method == "iso_c":  # 3 copies: the copy's singular vectors with the mean of 3x its singular values
        U, S, Vh = torch.linalg.svd(tv["blocks.0.mlp.c_fc.weight"], full_matrices=False)
        torch.testing.assert_close(merged["blocks.0.mlp.c_fc.weight"], 3 * S.mean() * U @ Vh, rtol=0, atol=1e-10)
    elif method == "dare_ta":  # each entry survives in k of 3 copies, scaled by 10: a multiple of 10/3 of the mean
        for key in tv:
            ratio = merged[key] / (tv[key] * 10)
            assert torch.equal(ratio.round(), ratio.round().clamp(0, 3)) and torch.allclose(ratio, ratio.round())
        survived = torch.cat([(merged[key] != 0).flatten() for key in tv]).double().mean()
        assert 0.22 < survived < 0.32  # 1 − 0.9³ = 0.271 of the ~1000 entries survive in some copy
    else:
        for key in tv:
            torch.testing.assert_close(merged[key], factor * tv[key], rtol=0, atol=1e-12, msg=key)


def test_ties_keeps_the_requested_density() -> None:
    tvs = [_model(seed) for seed in range(2)]
    trimmed = merge_task_vectors(tvs[:1], "ties", device="cpu", density=0.25)
    total = sum(v.numel() for v in trimmed.values())
    kept = sum(int((v != 0).sum()) for v in trimmed.values())
    # one task, distinct values: the threshold is the (P − int(P·K))-th smallest, so int(P·K) + 1 survive
    assert kept == int(0.25 * total) + 1


@pytest.mark.parametrize(("P", "density", "kept"), [(10, 0.2, 3), (15, 0.2, 4), (7, 0.2, 2), (4, 1.0, 4), (9, 0.05, 1)])
def test_ties_threshold_rank_on_small_models(P: int, density: float, kept: int) -> None:
    """The authors' rank k = P − int(P·K): int(P·K) + 1 entries kept (the old ⌊K·P⌋-th largest kept one fewer)."""
    values = torch.arange(1, P + 1, dtype=torch.float64) * torch.tensor([(-1.0) ** i for i in range(P)])
    merged = merge_task_vectors([{"w": values[: P // 2], "b": values[P // 2 :]}], "ties", device="cpu", density=density)
    survivors = torch.cat([merged["w"], merged["b"]])
    assert int((survivors != 0).sum()) == kept
    assert torch.equal(survivors[survivors != 0].abs().sort().values, torch.arange(P - kept + 1, P + 1).double())


@pytest.mark.parametrize("method", DATA_FREE)
def test_bad_option_is_rejected_with_the_valid_ones(method: str) -> None:
    with pytest.raises(ValueError, match=f"Unknown option.*merge method '{method}'. Valid options: "):
        merge_task_vectors([_model(0)], method, not_an_option=1)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ties", {"density": 0.0}, "density must lie in"),
        ("ties", {"density": 1.5}, "density must lie in"),
        ("pcb", {"ratio": 0.0}, "ratio must lie in"),
        ("pcb", {"clip": 0.5}, "clip must lie in"),
        ("iso_cts", {"common_fraction": 2.0}, "common_fraction must lie in"),
        ("ties", {"density": "0.2"}, "must be a finite number"),
        ("dare_ta", {"drop_rate": 1.0}, r"drop_rate must lie in \[0, 1\)"),
        ("dare_ties", {"drop_rate": -0.1}, r"drop_rate must lie in \[0, 1\)"),
        ("dare_ta", {"seed": 1.5}, "seed=1.5 of merge method 'dare_ta' must be an integer"),
        ("randmix", {"seed": -1}, "seed must be a non-negative integer"),
        ("randmix", {"seed": True}, "must be an integer"),
        ("breadcrumbs", {"keep": 0.0}, "keep must lie in"),
        ("breadcrumbs", {"keep": 0.95, "drop_top": 0.1}, "keep must lie in"),
        ("breadcrumbs", {"drop_top": 1.0}, "drop_top must lie in"),
        ("breadcrumbs", {"granularity": "column"}, r"granularity='column' is not valid .* \['layer', 'row'\]"),
        ("cart", {"rank_ratio": 0.0}, "rank_ratio must lie in"),
        ("wudi", {"iterations": -1}, "iterations must be a non-negative integer"),
        ("wudi", {"iterations": 2.5}, "must be an integer"),
        ("wudi", {"lr": 0.0}, "lr must be positive"),
        ("wudi", {"other_keys": "theta"}, r"other_keys='theta' is not valid .* \['zero', 'mean'\]"),
        ("model_stock", {"angle": "median"}, r"angle='median' is not valid"),
        ("model_stock", {"eps": -1.0}, "eps must be >= 0"),
        ("dare_ties", {"threshold": "half"}, r"threshold='half' is not valid .* \['mergelm', 'ties'\]"),
    ],
)
def test_bad_option_values(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_task_vectors([_model(0), _model(1)], method, **options)


# --- seeded methods: reproducible bit for bit, and independent of key order and of sharding ----------------


@pytest.mark.parametrize("method", SEEDED)
def test_seeded_same_seed_same_bits_different_seed_different_bits(method: str) -> None:
    tvs = [_model(seed, dtype=torch.float32) for seed in range(3)]
    first = merge_task_vectors(tvs, method, device="cpu", seed=123)
    again = merge_task_vectors(tvs, method, device="cpu", seed=123)
    other = merge_task_vectors(tvs, method, device="cpu", seed=124)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first if first[k].numel() > 8)
    assert get_method(method).defaults["seed"] == 0


@pytest.mark.parametrize("method", SEEDED)
def test_seeded_draws_do_not_depend_on_key_order(method: str) -> None:
    tvs = [_model(seed) for seed in range(3)]
    reversed_tvs = [dict(reversed(list(tv.items()))) for tv in tvs]
    a = merge_task_vectors(tvs, method, device="cpu", seed=9)
    b = merge_task_vectors(reversed_tvs, method, device="cpu", seed=9)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", [m for m in DATA_FREE if get_method(m).shardable])
def test_sharded_merge_equals_one_merge(method: str) -> None:
    """What a merge split across processes does: each merges some keys (statistics still see the whole model)."""
    tvs = [_model(seed) for seed in range(3)]
    options = {"seed": 4} if method in SEEDED else {"iterations": 20} if method == "wudi" else {}
    whole = merge_task_vectors(tvs, method, device="cpu", **options)
    keys = list(tvs[0])
    for part in (keys[0::3], keys[1::3], keys[2::3]):
        shard = merge_task_vectors(tvs, method, device="cpu", keys=part, **options)
        assert sorted(shard) == sorted(part)
        assert all(torch.equal(shard[k], whole[k]) for k in part), method


def test_dare_drops_at_the_requested_rate() -> None:
    """Over many entries the kept fraction is 1 − p, and kept entries are exactly τ/(1 − p)."""
    tv = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    merged = merge_task_vectors([tv], "dare_ta", device="cpu", drop_rate=0.7)["w"]
    kept = merged != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(merged[kept], tv["w"][kept] / 0.3, rtol=0, atol=1e-12)


def test_breadcrumbs_masks_outliers_and_negligible_entries() -> None:
    """One task, 1000 distinct magnitudes: the 10 largest and everything below the next 150 are masked."""
    values = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).double() + 1
    merged = merge_task_vectors([{"w": values}], "breadcrumbs", device="cpu", keep=0.15, drop_top=0.01)["w"]
    survivors = merged[merged != 0].sort().values
    assert torch.equal(survivors, torch.arange(841, 991).double())


def test_model_stock_ratio_on_two_experts() -> None:
    """Two updates at 60°: t = 2·0.5/(1 + 0.5) = 2/3 of their mean (the paper's two-model case); with FusionBench's
    ε the cosine is 0.5/(1 + ε) and the ratio's denominator gains ε."""
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.5, 3**0.5 / 2], dtype=torch.float64)
    exact = merge_task_vectors([{"w": a}, {"w": b}], "model_stock", device="cpu", eps=0.0)["w"]
    torch.testing.assert_close(exact, (2 / 3) * (a + b) / 2, rtol=0, atol=1e-15)
    c = 0.5 / (1 + 1e-8)
    merged = merge_task_vectors([{"w": a}, {"w": b}], "model_stock", device="cpu")["w"]
    torch.testing.assert_close(merged, 2 * c / (c + 1 + 1e-8) * (a + b) / 2, rtol=0, atol=1e-15)


def test_model_stock_shrinks_tiny_updates_by_its_epsilon() -> None:
    """FusionBench's ε = 1e-8 is comparable to ‖τ_i‖‖τ_j‖ for tiny updates: two equal updates of 1e-4 get
    cos = 1e-8/(1e-8 + 1e-8) = 1/2 and t = 2/3 (without ε, t = 1: the update itself)."""
    tv = {"w": torch.tensor([1e-4], dtype=torch.float64)}
    merged = merge_task_vectors([tv, tv], "model_stock", device="cpu")["w"]
    torch.testing.assert_close(merged, tv["w"] * 2 * 0.5 / (0.5 + 1 + 1e-8), rtol=1e-12, atol=0)
    exact = merge_task_vectors([tv, tv], "model_stock", device="cpu", eps=0.0)["w"]
    torch.testing.assert_close(exact, tv["w"], rtol=1e-12, atol=0)


def test_wudi_lowers_the_interference_it_minimises() -> None:
    tvs = [_model(seed) for seed in range(3)]
    key = "blocks.0.mlp.c_fc.weight"

    def interference(m: torch.Tensor) -> float:
        return sum((((m - tv[key]) @ tv[key].T).square().sum() / tv[key].square().sum()).item() for tv in tvs)

    start = sum(tv[key] for tv in tvs)
    merged = merge_task_vectors(tvs, "wudi", device="cpu", iterations=200, lr=1e-2)[key]
    assert interference(merged) < 0.5 * interference(start)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", DATA_FREE)
def test_cpu_and_cuda_agree(method: str) -> None:
    tvs = [_model(seed) for seed in range(3)]
    options = {"sign_convention": "canonical"} if method == "score" else {}
    cpu = merge_task_vectors(tvs, method, device="cpu", **options)
    cuda = merge_task_vectors(tvs, method, device="cuda", **options)
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=0, atol=1e-9 * max(1.0, cpu[key].abs().max().item()))
