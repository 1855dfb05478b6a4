"""RegMean and Fisher merging, the data-using methods of the core, with synthetic statistics against float64
references of their papers' formulas (applied to fine-tuned weights θ₀ + τ_t, so the tests also check that
θ₀ drops out)."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import get_method, merge_task_vectors
from tests.merging import reference_baselines as reference
from tests.merging.test_methods import _model

LINEAR = ["blocks.0.attn.out_proj.weight", "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight"]


def _grams(tvs: list[dict[str, torch.Tensor]], rows: int = 40) -> list[dict[str, torch.Tensor]]:
    """G_t = X_tᵀX_t / N for random inputs X_t (correlated columns, so the off-diagonal entries matter)."""
    out = []
    for t, tv in enumerate(tvs):
        g = torch.Generator().manual_seed(500 + t)
        grams = {}
        for key in LINEAR:
            n = tv[key].shape[1]
            x = torch.randn(rows, n, generator=g, dtype=torch.float64) @ (
                torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
            )
            grams[key] = x.T @ x / rows
        out.append(grams)
    return out


def _fishers(tvs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Non-negative, very uneven diagonal Fishers (some exact zeros) on every key but the positional embedding."""
    out = []
    for t, tv in enumerate(tvs):
        g = torch.Generator().manual_seed(700 + t)
        fishers = {}
        for key, value in tv.items():
            if key == "positional_embedding":
                continue
            f = torch.randn(value.shape, generator=g, dtype=torch.float64).square() * 10 ** (t - 1)
            f[f < 0.05] = 0.0
            fishers[key] = f
        out.append(fishers)
    return out


def _assert_matches(merged: dict, expected: dict) -> None:
    for key in expected:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-10 * scale, msg=key)


def test_both_are_registered_as_data_methods() -> None:
    for name in ("regmean", "fisher"):
        spec = get_method(name)
        assert spec.needs_data and spec.shardable and spec.scope == "all"


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("reduce_non_diagonal", [1.0, 0.3])
def test_regmean_matches_float64_reference(T: int, reduce_non_diagonal: float) -> None:
    tvs = [_model(s) for s in range(T)]
    grams = _grams(tvs)
    merged = merge_task_vectors(tvs, "regmean", device="cpu", grams=grams, reduce_non_diagonal=reduce_non_diagonal)
    _assert_matches(merged, reference.regmean(tvs, grams, reduce_non_diagonal))


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("fisher_floor", [1e-6, 0.5])
@pytest.mark.parametrize(("normalize", "favor_first"), [(True, True), (False, False), (True, False), (False, True)])
def test_fisher_matches_float64_reference(T: int, fisher_floor: float, normalize: bool, favor_first: bool) -> None:
    tvs = [_model(s) for s in range(T)]
    fishers = _fishers(tvs)
    options = {"fisher_floor": fisher_floor, "normalize_fishers": normalize, "favor_first_model": favor_first}
    merged = merge_task_vectors(tvs, "fisher", device="cpu", fishers=fishers, **options)
    _assert_matches(merged, reference.fisher(tvs, fishers, fisher_floor, normalize, favor_first))


def test_regmean_recovers_each_expert_on_its_own_inputs_when_inputs_are_disjoint() -> None:
    """Experts whose inputs live in orthogonal subspaces: the merge reproduces each one on its own inputs."""
    n, m = 6, 4
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    taus = [torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(2)]
    inputs = [torch.randn(10, 3, generator=g, dtype=torch.float64) @ basis[:, 3 * t : 3 * t + 3].T for t in range(2)]
    grams = [{"mlp.w": x.T @ x} for x in inputs]
    merged = merge_task_vectors([{"mlp.w": tau} for tau in taus], "regmean", device="cpu", grams=grams)["mlp.w"]
    for x, tau in zip(inputs, taus, strict=True):
        torch.testing.assert_close(x @ merged.T, x @ tau.T, rtol=0, atol=1e-10)
    assert not torch.allclose(merged, (taus[0] + taus[1]) / 2)


def test_fisher_follows_the_confident_expert() -> None:
    a, b = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 3.0], dtype=torch.float64)
    fishers = [
        {"w": torch.tensor([9.0, 0.0], dtype=torch.float64)},
        {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)},
    ]
    plain = {"normalize_fishers": False, "favor_first_model": False}  # every Fisher floored, not normalised
    merged = merge_task_vectors([{"w": a}, {"w": b}], "fisher", device="cpu", fishers=fishers, **plain)["w"]
    torch.testing.assert_close(merged, torch.tensor([1.2, 2.0], dtype=torch.float64))  # 0.9·1 + 0.1·3; floor: mean
    # the reference's defaults: each weight divided by its whole Fisher's norm (9 and 1), so the two experts weigh
    # the same on the first entry; only the first model is floored, so it alone defines the second entry
    merged = merge_task_vectors([{"w": a}, {"w": b}], "fisher", device="cpu", fishers=fishers)["w"]
    torch.testing.assert_close(merged, torch.tensor([2.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_identical_tasks_give_the_task_and_are_deterministic(method: str) -> None:
    tv = _model(2)
    stats = {"regmean": {"grams": _grams([tv, tv, tv])}, "fisher": {"fishers": _fishers([tv, tv, tv])}}[method]
    first = merge_task_vectors([tv, tv, tv], method, device="cpu", **stats)
    second = merge_task_vectors([tv, tv, tv], method, device="cpu", **stats)
    for key in tv:
        assert torch.equal(first[key], second[key])
        torch.testing.assert_close(first[key], tv[key], rtol=0, atol=1e-10, msg=key)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(method: str, dtype: torch.dtype) -> None:
    tvs64 = [_model(s) for s in range(3)]
    stats = {"regmean": {"grams": _grams(tvs64)}, "fisher": {"fishers": _fishers(tvs64)}}[method]
    tvs = [{k: v.to(dtype) for k, v in tv.items()} for tv in tvs64]
    merged = merge_task_vectors(tvs, method, device="cpu", **stats)
    exact = merge_task_vectors([{k: v.double() for k, v in tv.items()} for tv in tvs], method, device="cpu", **stats)
    for key, value in merged.items():
        assert value.dtype == dtype and value.shape == tvs[0][key].shape
        rel = (value.double() - exact[key]).norm() / exact[key].norm()
        assert rel < (2.0**-8 if dtype == torch.bfloat16 else 1e-5), (key, rel.item())


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_sharded_merge_equals_one_merge_and_metadata_keeps_no_tensors(method: str) -> None:
    tvs = [_model(s) for s in range(3)]
    option = {"regmean": "grams", "fisher": "fishers"}[method]
    stats = {"regmean": _grams, "fisher": _fishers}[method](tvs)
    whole = merge_task_vectors(tvs, method, device="cpu", **{option: stats})
    keys = list(tvs[0])
    for part in (keys[0::2], keys[1::2]):
        shard = merge_task_vectors(tvs, method, device="cpu", keys=part, **{option: stats})
        assert all(torch.equal(shard[k], whole[k]) for k in part)
    assert whole.metadata["merge"]["options"][option] == "<list not recorded>"


def test_regmean_singular_gram_sum_names_the_layer_and_the_fix() -> None:
    tvs = [_model(s) for s in range(2)]
    grams = _grams(tvs, rows=3)  # 6 rows in all for layers of input width 12 and 24: rank deficient
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.out_proj.weight' is not positive definite.*below 1"):
        merge_task_vectors(tvs, "regmean", device="cpu", grams=grams)
    merged = merge_task_vectors(tvs, "regmean", device="cpu", grams=grams, reduce_non_diagonal=0.5)
    assert all(torch.isfinite(v).all() for v in merged.values())


@pytest.mark.parametrize(
    ("method", "bad", "message"),
    [
        ("regmean", None, r"'regmean' needs data: pass grams="),
        ("regmean", "one-task", r"grams for 1 task\(s\) but 2 task vectors"),
        ("regmean", "other-keys", "grams of task 1 cover other layers"),
        ("regmean", "unknown-key", "grams given for 'nope', which is not a key"),
        ("regmean", "not-2d", r"'blocks.0.attn.out_proj.bias', which has shape \(12,\), not a 2-D weight"),
        ("regmean", "shape", r"Gram matrix of 'blocks.0.mlp.c_proj.weight' for task 1 has shape \(12, 12\); expected \[24, 24\]"),
        ("regmean", "nan", "for task 0 has NaN or inf"),
        ("regmean", "mapping", "grams must be a list"),
        ("fisher", None, r"'fisher' needs data: pass fishers="),
        ("fisher", "one-task", r"fishers for 1 task\(s\) but 2 task vectors"),
        ("fisher", "other-keys", "fishers of task 1 cover other keys"),
        ("fisher", "unknown-key", "given for 'nope', which is not a key"),
        ("fisher", "shape", r"Fisher tensor of 'conv.weight' for task 1 has shape \(4, 3\)"),
        ("fisher", "negative", "for task 0 has negative, NaN or inf"),
        ("fisher", "mapping", "fishers must be a list"),
    ],
)  # fmt: skip
def test_bad_statistics(method: str, bad: str | None, message: str) -> None:
    tvs = [_model(s) for s in range(2)]
    option = {"regmean": "grams", "fisher": "fishers"}[method]
    stats = {"regmean": _grams, "fisher": _fishers}[method](tvs)
    key = LINEAR[0] if method == "regmean" else "conv.weight"
    if bad == "one-task":
        stats = stats[:1]
    elif bad == "other-keys":
        del stats[1][key]
    elif bad == "unknown-key":
        stats = [{**s, "nope": torch.zeros(1, 1)} for s in stats]
    elif bad == "not-2d":
        stats = [{**s, "blocks.0.attn.out_proj.bias": torch.zeros(12, 12)} for s in stats]
    elif bad == "shape":
        wrong = "blocks.0.mlp.c_proj.weight" if method == "regmean" else key
        stats[1][wrong] = torch.zeros(12, 12) if method == "regmean" else torch.zeros(4, 3)
    elif bad in ("nan", "negative"):
        stats[0][key] = stats[0][key].clone()
        stats[0][key].view(-1)[0] = float("nan") if bad == "nan" else -1.0
    elif bad == "mapping":
        stats = stats[0]
    options = {} if bad is None else {option: stats}
    with pytest.raises(ValueError, match=message):
        merge_task_vectors(tvs, method, device="cpu", **options)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("regmean", {"reduce_non_diagonal": 1.5}, r"reduce_non_diagonal must lie in \[0, 1\]"),
        ("fisher", {"fisher_floor": 0.0}, "fisher_floor must be positive"),
    ],
)
def test_bad_option_values(method: str, options: dict, message: str) -> None:
    tvs = [_model(s) for s in range(2)]
    stats = {"regmean": {"grams": _grams(tvs)}, "fisher": {"fishers": _fishers(tvs)}}[method]
    with pytest.raises(ValueError, match=message):
        merge_task_vectors(tvs, method, device="cpu", **stats, **options)
