"""KnOTS against its float64 reference (tests/merging/reference_knots.py), plus its properties on LoRA-like and
full-rank updates: one task, identical tasks, tasks on disjoint rows and columns, rank-deficient tasks (no
dependence on the solver's null space), precision, seeds and option errors."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import merge_task_vectors
from lightning_score.merging.methods.knots import MERGE_RULES, aligned_basis
from tests.merging.reference_knots import knots as reference_knots

KEYS = {  # (m, n, LoRA rank): a block's square, tall and wide layers
    "blocks.0.attn.out_proj.weight": (16, 16, 2),
    "blocks.0.mlp.c_fc.weight": (32, 16, 3),
    "blocks.0.mlp.c_proj.weight": (16, 32, 2),
}


def _lora_expert(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A LoRA expert's task vector: s·B·A on the adapted layers, zero on the rest (a bias, a matrix left frozen)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(1000)  # a direction every task shares, so TIES has signs to elect
    tv = {}
    for key, (m, n, rank) in KEYS.items():
        B = torch.randn(m, rank, generator=g, dtype=torch.float64)
        A = torch.randn(rank, n, generator=g, dtype=torch.float64) + 0.8 * torch.randn(rank, n, generator=shared)
        tv[key] = (0.5 * B @ A).to(dtype)
    tv["positional_embedding"] = torch.zeros(8, 16, dtype=dtype)
    tv["blocks.0.attn.out_proj.bias"] = torch.zeros(16, dtype=dtype)
    return tv


def _full_expert(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tv = {key: torch.randn(m, n, generator=g, dtype=torch.float64) for key, (m, n, _) in KEYS.items()}
    tv["blocks.0.attn.out_proj.bias"] = torch.randn(16, generator=g, dtype=torch.float64)
    return tv


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        scale = max(1.0, expected[key].abs().max().item())
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-10 * scale, msg=f"{what} {key}")


OPTIONS = [
    {},
    {"merge": "sum"},
    {"merge": "mean", "density": 0.5},
    {"density": 0.35, "drop_rate": 0.3, "seed": 5},
    {"density": 1.0, "drop_rate": 0.1, "seed": 421},  # the authors' ViT KnOTS-DARE-TIES (topK = 100, p = 0.1)
    {"rank_tolerance": 6.0},  # drops the concatenations' weakest directions
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("experts", [_lora_expert, _full_expert])
def test_matches_float64_reference(experts, T: int, options: dict) -> None:
    tvs = [experts(seed) for seed in range(T)]
    merged = merge_task_vectors(tvs, "knots", device="cpu", **options)
    _assert_close(merged, reference_knots(tvs, **options), f"T={T} {options}")


def test_options_change_the_result() -> None:
    tvs = [_lora_expert(seed) for seed in range(3)]
    key = "blocks.0.mlp.c_fc.weight"
    results = [merge_task_vectors(tvs, "knots", device="cpu", **options)[key] for options in OPTIONS]
    for i in range(len(results)):
        for j in range(i):
            assert not torch.allclose(results[i], results[j]), (OPTIONS[i], OPTIONS[j])


@pytest.mark.parametrize("merge", MERGE_RULES)
def test_one_task_untrimmed_is_its_own_update(merge: str) -> None:
    """One task, nothing trimmed: each rule is the identity (the disjoint mean and the mean of one value, the sum
    of one value), and Δ = U R exactly once the concatenation's zero singular values are dropped."""
    tv = _lora_expert(4)
    merged = merge_task_vectors([tv], "knots", device="cpu", density=1.0, merge=merge)
    for key in tv:
        torch.testing.assert_close(merged[key], tv[key], rtol=0, atol=1e-12, msg=key)


def test_untrimmed_sum_is_task_arithmetic() -> None:
    """U Σ_t R_t = Σ_t Δ_t: without a trim the sum in the aligned space is the plain sum, for any tasks."""
    tvs = [_full_expert(seed) for seed in range(3)]
    merged = merge_task_vectors(tvs, "knots", device="cpu", density=1.0, merge="sum")
    _assert_close({k: merged[k] for k in KEYS}, {k: sum(tv[k] for tv in tvs) for k in KEYS})
    bias = "blocks.0.attn.out_proj.bias"  # not a matrix: the mean over tasks
    torch.testing.assert_close(merged[bias], sum(tv[bias] for tv in tvs) / 3, rtol=0, atol=1e-15)


def test_identical_tasks_merge_as_one() -> None:
    """[W | W | W] = U (√3 Σ) [Vᵀ/√3 | …]: each copy's aligned block is its own Σ Vᵀ, the same count P and the same
    trim, so three copies merge as one (TIES, mean) or three times one (sum)."""
    tv = _lora_expert(2)
    for merge, factor in (("ties", 1.0), ("mean", 1.0), ("sum", 3.0)):
        one = merge_task_vectors([tv], "knots", device="cpu", merge=merge)
        three = merge_task_vectors([tv, tv, tv], "knots", device="cpu", merge=merge)
        _assert_close(three, {key: factor * value for key, value in one.items()}, merge)
        assert (one["blocks.0.mlp.c_fc.weight"] != 0).any()


def test_tasks_on_disjoint_rows_and_columns_are_summed() -> None:
    """Each task updates its own rows and columns: in the aligned space no entry is shared by two tasks up to
    rounding, so TIES's disjoint mean is each task's own value: the sum, not the mean. The trim (K = 0.1: the 10 of
    each task's 90 aligned entries that are its own block's) removes the rounding, which would otherwise enter the
    disjoint means as agreeing values of about 1e-16."""
    g = torch.Generator().manual_seed(0)
    tvs = []
    for t in range(3):
        delta = torch.zeros(18, 15, dtype=torch.float64)
        delta[6 * t : 6 * t + 6, 5 * t : 5 * t + 5] = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
            2, 5, generator=g, dtype=torch.float64
        )
        tvs.append({"w": delta})
    ties = merge_task_vectors(tvs, "knots", device="cpu", density=0.1)["w"]
    summed = merge_task_vectors(tvs, "knots", device="cpu", density=0.1, merge="sum")["w"]
    mean = merge_task_vectors(tvs, "knots", device="cpu", density=0.1, merge="mean")["w"]
    torch.testing.assert_close(summed, sum(tv["w"] for tv in tvs), rtol=0, atol=1e-12)
    torch.testing.assert_close(ties, summed, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, summed / 3, rtol=0, atol=1e-12)
    for t in range(3):
        block = ties[6 * t : 6 * t + 6, 5 * t : 5 * t + 5]
        assert block.abs().max() > 0.1
        ties[6 * t : 6 * t + 6, 5 * t : 5 * t + 5] = 0
    assert ties.abs().max() < 1e-12  # nothing outside the tasks' own blocks


def test_rank_deficient_tasks_use_their_rank_only() -> None:
    """T LoRA updates of rank 2 on a 16×16 key: the concatenation has rank 2T, the basis keeps exactly those
    directions, and TIES counts P = 2T·n aligned entries per task (not min(m, Tn)·n), so one task trimmed at
    K = 0.25 keeps int(P·K) + 1 of them."""
    key = "blocks.0.attn.out_proj.weight"
    tvs = [{key: _lora_expert(seed)[key]} for seed in range(3)]
    deltas = torch.stack([tv[key] for tv in tvs])
    U, S, Vs = aligned_basis(deltas)
    assert U.shape == (16, 6) and S.shape == (6,) and Vs.shape == (3, 6, 16)
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    for t in range(3):
        torch.testing.assert_close((U * S) @ Vs[t], deltas[t], rtol=0, atol=1e-12)
    merged = merge_task_vectors(tvs[:1], "knots", device="cpu", density=0.25)[key]
    U1, _, _ = aligned_basis(deltas[:1])
    kept = (U1.T @ merged).abs() > 1e-12
    assert U1.shape[1] == 2 and int(kept.sum()) == int(2 * 16 * 0.25) + 1
    torch.testing.assert_close(U1 @ (U1.T @ merged), merged, rtol=0, atol=1e-12)  # no direction outside the span


def test_rank_deficient_result_does_not_depend_on_the_solver_s_null_space() -> None:
    """Rotate the output space by an orthogonal Q and permute the input space by P: the solver now returns another
    basis of the concatenation's null space (and other signs), yet KnOTS(QΔ_tP) = Q·KnOTS(Δ_t)·P, because only the
    triplets with σ > tolerance enter and the trim, election and means do not see a triplet's sign."""
    g = torch.Generator().manual_seed(3)
    tvs = [_lora_expert(seed) for seed in range(4)]
    rotated = []
    transforms = {}
    for key, (m, n, _) in KEYS.items():
        Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        P = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        transforms[key] = (Q, P)
    for tv in tvs:
        rotated.append({k: (transforms[k][0] @ v @ transforms[k][1] if k in transforms else v) for k, v in tv.items()})
    for options in ({}, {"merge": "mean", "density": 0.5}, {"density": 1.0}):
        plain = merge_task_vectors(tvs, "knots", device="cpu", **options)
        turned = merge_task_vectors(rotated, "knots", device="cpu", **options)
        expected = {k: (transforms[k][0] @ v @ transforms[k][1] if k in transforms else v) for k, v in plain.items()}
        _assert_close(turned, expected, str(options))


def test_keys_without_an_update_change_nothing() -> None:
    """A LoRA expert's frozen matrices are zero in every task: rank 0, no aligned entry, so they neither count in
    P nor shift the thresholds (the authors' code merges only the adapted layers), and they merge to zero."""
    tvs = [_lora_expert(seed) for seed in range(3)]
    merged = merge_task_vectors(tvs, "knots", device="cpu")
    adapted_only = merge_task_vectors([{k: tv[k] for k in KEYS} for tv in tvs], "knots", device="cpu")
    assert torch.equal(merged["positional_embedding"], torch.zeros(8, 16, dtype=torch.float64))
    for key in KEYS:
        assert torch.equal(merged[key], adapted_only[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_in_low_precision_out_computed_in_float32_or_more(dtype: torch.dtype) -> None:
    tvs = [_lora_expert(seed, dtype=dtype) for seed in range(3)]
    merged = merge_task_vectors(tvs, "knots", device="cpu")
    exact = merge_task_vectors(tvs, "knots", device="cpu", compute_dtype=torch.float64)
    deltas = torch.stack([tv["blocks.0.mlp.c_fc.weight"] for tv in tvs]).float()
    assert all(t.dtype == torch.float32 for t in aligned_basis(deltas))
    for key, value in merged.items():
        assert value.dtype == dtype and value.shape == tvs[0][key].shape
        if key in KEYS:
            rel = (value.double() - exact[key].double()).norm() / exact[key].double().norm()
            assert rel < (1e-6 if dtype == torch.float32 else 2.0**-8), (key, rel.item())


def test_dare_is_seeded_per_key() -> None:
    tvs = [_lora_expert(seed, dtype=torch.float32) for seed in range(3)]
    first = merge_task_vectors(tvs, "knots", device="cpu", drop_rate=0.3, seed=7)
    again = merge_task_vectors([dict(reversed(list(tv.items()))) for tv in tvs], "knots", drop_rate=0.3, seed=7)
    other = merge_task_vectors(tvs, "knots", device="cpu", drop_rate=0.3, seed=8)
    for key in KEYS:
        assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key]), key


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"density": 0.0}, r"knots: density must lie in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"knots: density must lie in \(0, 1\], got 1.5"),
        (
            {"merge": "max"},
            r"merge='max' is not valid for merge method 'knots'; choose one of \['ties', 'sum', 'mean'\]",
        ),
        ({"drop_rate": 1.0}, r"knots: drop_rate must lie in \[0, 1\), got 1.0"),
        ({"seed": -1}, "knots: seed must be a non-negative integer, got -1"),
        ({"rank_tolerance": -1e-3}, "knots: rank_tolerance must be >= 0, got -0.001"),
        ({"density": "0.2"}, "density='0.2' of merge method 'knots' must be a finite number"),
    ],
)
def test_bad_options_are_refused_with_the_valid_range(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_task_vectors([_lora_expert(0), _lora_expert(1)], "knots", device="cpu", **options)
