"""merging.task_matrices and the factor path: LoRA experts merged from their factors, against float64 references.

The references are written here from docs/methods.md and the spec ("Rank-deficient tasks"): the r-slot layout of
SCORE and TSV-M, task t in slots t·k … t·k + k_t − 1 with k_t = min(k, ρ_t), the rest zero, polar factors of the
whole r-slot concatenations, SCORE's statistics over all r² entries. The factor path computes it from the factors
(and, when every task lies in its kept span, from the used slots only), so agreement checks both steps.
"""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import merge_task_vectors
from lightning_score.merging.low_rank import LowRankUpdate
from lightning_score.merging.methods.score import score_merge
from lightning_score.merging.methods.tsv import tsv_merge
from lightning_score.merging.task_matrices import RankDeficientError, TaskMatrices
from lightning_score.task_vector import TaskVector

F64 = torch.float64


def _lora(m: int, n: int, rho: int, seed: int, scale: float = 0.5) -> LowRankUpdate:
    g = torch.Generator().manual_seed(seed)
    return LowRankUpdate(
        torch.randn(m, rho, generator=g, dtype=F64), torch.randn(rho, n, generator=g, dtype=F64), scale
    )


def _canonical(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(U, 0, index))
    return U * signs, Vh * signs.mT


def _polar(A: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def _leading(delta: torch.Tensor, count: int, null: torch.Tensor | None = None) -> tuple:
    """A task's leading ``count`` triplets (canonical signs); with ``null``, vectors beyond its rank come from it."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, Vh = _canonical(U, Vh)
    if null is not None:
        rank = int((S[0] * 1e-10 < S).sum())
        U = torch.cat([U[:, :rank], null[0]], dim=1)
        Vh = torch.cat([Vh[:rank], null[1]], dim=0)
        S = torch.cat([S[:rank], torch.zeros(null[0].shape[1], dtype=S.dtype)])
    return U[:, :count], S[:count], Vh[:count]


def _reference(deltas: list[torch.Tensor], ranks: list[int | None], method: str, nulls=None, z: float = 1.96):
    """SCORE (trimmed) or TSV-M of the spec, in float64, with k_t = min(k, ρ_t) (ρ_t None: k)."""
    m, n = deltas[0].shape
    r, T = min(m, n), len(deltas)
    k = r // T
    U_cat, s_cat, Vh_cat = torch.zeros(m, r, dtype=F64), torch.zeros(r, dtype=F64), torch.zeros(r, n, dtype=F64)
    for t, delta in enumerate(deltas):
        k_t = k if ranks[t] is None else min(k, ranks[t])
        U, S, Vh = _leading(delta, k_t, None if nulls is None else nulls[t])
        U_cat[:, t * k : t * k + k_t], s_cat[t * k : t * k + k_t], Vh_cat[t * k : t * k + k_t] = U, S, Vh
    U_p, Vh_p = _polar(U_cat), _polar(Vh_cat)
    if method == "tsv":
        return (U_p * s_cat) @ Vh_p
    sigma = torch.zeros(r, r, dtype=F64)
    off = ~torch.eye(r, dtype=torch.bool)
    for delta in deltas:
        C = U_p.T @ delta @ Vh_p.T
        coupling = C * off
        mean, std = coupling.mean(), coupling.std(correction=1)
        keep = ((coupling - mean).abs() <= z * std / T) & off
        sigma += torch.diag(torch.diagonal(C)) + C * keep
    return U_p @ sigma @ Vh_p


def _relative(a: torch.Tensor | LowRankUpdate, b: torch.Tensor) -> float:
    """The largest entry of |a − b| relative to b's largest (a merge of low rank may come as its factors)."""
    a = a.dense(torch.float64) if isinstance(a, LowRankUpdate) else a
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["score", "tsv"])
@pytest.mark.parametrize(("m", "n", "rho", "T"), [(24, 16, 2, 3), (16, 24, 3, 4), (20, 20, 5, 2)])
def test_the_factor_path_is_the_spec_with_k_t_equal_min_k_rho(method, m, n, rho, T):
    """k > ρ: the factor path (used slots only) equals the spec's r-slot computation with the other slots zero."""
    updates = [_lora(m, n, rho, seed=t) for t in range(T)]
    assert min(m, n) // T > rho
    tasks = TaskMatrices.of(updates)
    got = score_merge(tasks, sign_convention="canonical") if method == "score" else tsv_merge(tasks)
    assert isinstance(got, LowRankUpdate) and got.rank == T * rho  # the merge of LoRA experts stays low rank
    expected = _reference([u.dense() for u in updates], [rho] * T, method)
    assert _relative(got, expected) < 1e-10


@pytest.mark.parametrize("method", ["score", "tsv"])
def test_the_result_no_longer_depends_on_the_null_space_the_solver_picks(method):
    """Rotating the vectors a solver returns beyond a task's rank changes the k-slot merge, not the k_t one."""
    m, n, rho, T = 24, 18, 2, 3  # k = 6 > ρ = 2
    updates = [_lora(m, n, rho, seed=10 + t) for t in range(T)]
    deltas = [u.dense() for u in updates]
    k = min(m, n) // T
    nulls_a, nulls_b = [], []
    for t, delta in enumerate(deltas):
        U, _, Vh = torch.linalg.svd(delta, full_matrices=True)
        left, right = U[:, rho : rho + k - rho], Vh[rho : rho + n - rho]  # orthonormal null-space bases
        g = torch.Generator().manual_seed(100 + t)
        rotation_u = torch.linalg.qr(torch.randn(m - rho, m - rho, generator=g, dtype=F64))[0]
        rotation_v = torch.linalg.qr(torch.randn(n - rho, n - rho, generator=g, dtype=F64))[0]
        full_left, full_right = U[:, rho:], Vh[rho:]
        nulls_a.append((left, right[: k - rho]))
        nulls_b.append(((full_left @ rotation_u)[:, : k - rho], (rotation_v.T @ full_right)[: k - rho]))
    dense_a = _reference(deltas, [None] * T, method, nulls_a)  # the k-slot definition: null-space vectors used
    dense_b = _reference(deltas, [None] * T, method, nulls_b)
    assert _relative(dense_a, dense_b) > 1e-3  # the old definition depends on the solver's choice
    ranked_a = _reference(deltas, [rho] * T, method, nulls_a)
    ranked_b = _reference(deltas, [rho] * T, method, nulls_b)
    assert _relative(ranked_a, ranked_b) < 1e-10
    tasks = TaskMatrices.of(updates)
    got = score_merge(tasks, sign_convention="canonical") if method == "score" else tsv_merge(tasks)
    assert _relative(got, ranked_a) < 1e-10


@pytest.mark.parametrize("method", ["score", "tsv"])
def test_tasks_of_rank_at_least_k_keep_the_authors_computation(method):
    """ρ ≥ k: k_t = k, and the factor path equals the dense definition on the dense matrices."""
    m, n, T, rho = 18, 12, 3, 6  # k = 4 ≤ ρ
    updates = [_lora(m, n, rho, seed=20 + t) for t in range(T)]
    deltas = torch.stack([u.dense() for u in updates])
    got = score_merge(TaskMatrices.of(updates), sign_convention="canonical") if method == "score" else None
    if method == "tsv":
        got = tsv_merge(TaskMatrices.of(updates))
        expected = tsv_merge(deltas)
    else:
        expected = score_merge(deltas, sign_convention="canonical")
    assert _relative(got, expected) < 1e-10


def test_one_task_and_identical_tasks():
    """One LoRA task: TSV-M and SCORE return it (its kept triplets span it). Identical LoRA tasks: CART's centred
    deviations vanish, so it returns the task (SCORE's and TSV-M's polar factors of a repeated basis are not unique)."""
    update = _lora(16, 12, 3, seed=3)
    one = TaskMatrices.of([update])
    assert _relative(tsv_merge(one), update.dense()) < 1e-10
    assert _relative(score_merge(one, variant="full"), update.dense()) < 1e-10
    tvs = [TaskVector({}, {"name": f"same{t}"}, {"mlp.c_fc.weight": update}) for t in range(3)]
    merged = merge_task_vectors(tvs, "cart", device="cpu")
    assert _relative(merged["mlp.c_fc.weight"], update.dense()) < 1e-10


def test_orthogonal_tasks_merge_to_their_sum():
    """Tasks on disjoint rows and columns: the shared basis is theirs, and SCORE/TSV-M give Σ_t Δ_t."""
    m, n, rho = 16, 16, 2
    parts = []
    for t in range(2):
        B = torch.zeros(m, rho, dtype=F64)
        A = torch.zeros(rho, n, dtype=F64)
        B[t * 8 : t * 8 + rho] = torch.randn(rho, rho, dtype=F64, generator=torch.Generator().manual_seed(t))
        A[:, t * 8 : t * 8 + rho] = torch.eye(rho, dtype=F64) * (t + 2)
        parts.append(LowRankUpdate(B, A, 1.0))
    total = sum(p.dense() for p in parts)
    tasks = TaskMatrices.of(parts)
    assert _relative(tsv_merge(tasks), total) < 1e-10
    assert _relative(score_merge(tasks, sign_convention="canonical"), total) < 1e-10


def test_a_mixed_set_merges_lora_and_full_experts_by_one_definition():
    """LoRA and dense experts together: TSV-M from the factors equals the spec's r-slot computation.

    (A LoRA task's unused slots are zero, as the last r − T·k slots are when T·k < r; a full expert's projections
    onto the polar factor's completion of those slots are not zero, so SCORE's result on a mixed set depends on that
    completion, as the spec says of the T·k < r case: only TSV-M, whose zero singular values drop it, is compared.)
    """
    m, n = 18, 12
    dense = torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(5))
    parts = [_lora(m, n, 2, seed=6), dense, _lora(m, n, 1, seed=7)]
    tasks = TaskMatrices.of(parts)
    expected = _reference([p.dense() if isinstance(p, LowRankUpdate) else p for p in parts], [2, None, 1], "tsv")
    assert _relative(tsv_merge(tasks), expected) < 1e-9
    assert _relative(tsv_merge(tasks.densified()), expected) < 1e-9
    merged = score_merge(tasks, sign_convention="canonical")
    assert merged.shape == (m, n) and bool(torch.isfinite(merged).all())


def _lora_tvs(shapes: dict[str, tuple[int, int]], rho: int, T: int, dtype=torch.float32) -> list[TaskVector]:
    tvs = []
    for t in range(T):
        g = torch.Generator().manual_seed(40 + t)
        low_rank = {
            key: LowRankUpdate(
                torch.randn(m, rho, generator=g).to(dtype), torch.randn(rho, n, generator=g).to(dtype), 2.0
            )
            for key, (m, n) in shapes.items()
        }
        bias = {"blocks.0.bias": torch.randn(shapes["blocks.0.weight"][0], generator=g).to(dtype)}
        tvs.append(TaskVector(bias, {"name": f"lora{t}"}, low_rank))
    return tvs


class _NoDense(TaskVector):
    """A task vector whose low-rank entries refuse to be made dense: the factor path must never ask."""

    def __getitem__(self, key):
        if self.low_rank(key) is not None:
            raise AssertionError(f"the dense update of '{key}' was built")
        return super().__getitem__(key)


@pytest.mark.parametrize(
    ("method", "options"),
    [("score", {"sign_convention": "canonical"}), ("score", {"variant": "full"}), ("tsv", {}), ("cart", {})],
)
def test_the_engine_merges_lora_task_vectors_through_their_factors(method, options, tmp_path):
    """merge_task_vectors: factors in, never densified, equal to the dense path of the same definition (1e-6)."""
    shapes = {"blocks.0.weight": (48, 32), "blocks.0.attn.weight": (96, 32)}
    tvs = _lora_tvs(shapes, rho=3, T=4, dtype=torch.float64)
    no_dense = [
        _NoDense({"blocks.0.bias": tv["blocks.0.bias"]}, tv.metadata, {k: tv.low_rank(k) for k in shapes}) for tv in tvs
    ]
    through = merge_task_vectors(no_dense, method, device="cpu", **options)
    dense = merge_task_vectors(tvs, method, device="cpu", through_factors=False, **options)
    for key in shapes:
        assert _relative(through[key], dense[key]) < 1e-6
    assert torch.equal(through["blocks.0.bias"], dense["blocks.0.bias"])
    assert through.metadata["merge"]["low_rank_keys"] == 2
    assert through.low_rank_keys == (frozenset() if method == "cart" else frozenset(shapes))  # SCORE/TSV: rank ≤ Tρ
    assert through.tensor_spec("blocks.0.weight") == ((48, 32), torch.float64)
    paths = [tv.save(tmp_path / f"{t}.safetensors") for t, tv in enumerate(tvs)]  # lazily loaded files: the same
    loaded = merge_task_vectors([TaskVector.load(p) for p in paths], method, device="cpu", **options)
    for key in shapes:
        assert _relative(loaded[key], through[key]) < 1e-12


def test_elementwise_methods_read_the_dense_updates_one_key_at_a_time():
    shapes = {"blocks.0.weight": (12, 8)}
    tvs = _lora_tvs(shapes, rho=2, T=3)
    dense = [TaskVector({k: tv[k] for k in tv}, tv.metadata) for tv in tvs]
    for method in ("ties", "task_arithmetic"):
        assert torch.equal(
            merge_task_vectors(tvs, method)["blocks.0.weight"], merge_task_vectors(dense, method)["blocks.0.weight"]
        )


def test_iso_refuses_lora_experts_whose_sum_leaves_directions_to_the_solver():
    shapes = {"blocks.0.weight": (24, 16)}
    with pytest.raises(RankDeficientError, match=r"iso_c.*key 'blocks.0.weight'.*rank at most 6"):
        merge_task_vectors(_lora_tvs(shapes, rho=2, T=3), "iso_c")
    with pytest.raises(RankDeficientError, match="LoRA ranks"):
        merge_task_vectors(_lora_tvs(shapes, rho=2, T=3), "iso_cts")
    full = _lora_tvs(shapes, rho=6, T=3, dtype=torch.float64)  # Σρ = 18 ≥ r = 16: defined
    dense = [TaskVector({k: tv[k] for k in tv}, tv.metadata) for tv in full]
    got, expected = merge_task_vectors(full, "iso_c"), merge_task_vectors(dense, "iso_c")
    assert _relative(got["blocks.0.weight"], expected["blocks.0.weight"]) < 1e-9


def test_esm_merges_its_tsv_layers_of_lora_experts_through_the_factors_and_rescales_them():
    """ESM: out_proj (TSV-M) from the factors, made dense for step 5's layer-type rescaling; the same as dense."""
    keys = {
        "transformer.resblocks.0.attn.in_proj_weight": (96, 32),
        "transformer.resblocks.0.attn.out_proj.weight": (32, 32),
        "transformer.resblocks.1.attn.out_proj.weight": (32, 32),
    }
    tvs = []
    for t in range(3):
        g = torch.Generator().manual_seed(70 + t)
        low_rank = {
            k: LowRankUpdate(torch.randn(m, 2, generator=g, dtype=F64), torch.randn(2, n, generator=g, dtype=F64))
            for k, (m, n) in keys.items()
        }
        tvs.append(TaskVector({}, {"name": f"e{t}"}, low_rank))
    target = "transformer.resblocks.0.attn.in_proj_weight"
    activations = [
        {target: torch.randn(40, 32, generator=torch.Generator().manual_seed(t), dtype=F64)} for t in range(3)
    ]
    through = merge_task_vectors(tvs, "esm", device="cpu", activations=activations)
    dense = merge_task_vectors(tvs, "esm", device="cpu", activations=activations, through_factors=False)
    assert through.low_rank_keys == frozenset()  # rescaled in finalize: dense
    for key in keys:
        assert _relative(through[key], dense[key]) < 1e-9, key
    norms = [torch.linalg.vector_norm(through[k]) for k in keys if "out_proj" in k]
    assert not torch.allclose(norms[0], norms[1])  # rescaled by (norm / mean)², which a missed key would not be
    tsv = merge_task_vectors(tvs, "tsv", device="cpu")  # k_t = min(k, ρ) = 2 of k = 10: ESM's out_proj is it, rescaled
    for key in (k for k in keys if "out_proj" in k):
        a, b = through[key].flatten(), tsv[key].flatten()
        assert float(a @ b / (a.norm() * b.norm())) > 1 - 1e-9, key
