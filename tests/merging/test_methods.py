"""The shared test matrix: every registered data-free method against the spec's float64 reference, plus
shapes, dtypes, T = 1, identical task vectors, determinism, devices and bad options."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging import get_method, list_methods, merge_task_vectors
from tests.merging import reference

DATA_FREE = [name for name in list_methods() if not get_method(name).needs_data]
EXPECTED = {"score", "tsv", "iso_c", "iso_cts", "ties", "magmax", "pcb", "task_arithmetic", "average"}


def _model(seed: int, r: int = 12, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A small "image tower": square, tall and wide matrices (T | r for T = 2, 3, 4 with r = 12), and the rest."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.Generator().manual_seed(999)

    def make(*shape: int) -> torch.Tensor:  # correlated across tasks, so the methods disagree with the mean
        return (torch.randn(*shape, generator=g) + 0.7 * torch.randn(*shape, generator=shared)).to(dtype)

    return {
        "square.weight": make(r, r),
        "tall.weight": make(3 * r, r),
        "wide.weight": make(r, 2 * r),
        "bias": make(r),
        "conv.weight": make(4, 3, 2, 2),
        "text_projection": make(r, r // 2),
    }


def test_every_spec_method_is_registered_with_a_reference() -> None:
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


@pytest.mark.parametrize("method", ["ties", "pcb", "iso_cts"])
def test_options_match_reference(method: str) -> None:
    options = {"ties": {"density": 0.55}, "pcb": {"ratio": 0.3, "clip": 0.1}, "iso_cts": {"common_fraction": 0.5}}[
        method
    ]
    tvs = [_model(seed) for seed in range(3)]
    expected = reference.merge_model(tvs, method, **options)
    merged = merge_task_vectors(tvs, method, device="cpu", **options)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-10, msg=key)
    default = merge_task_vectors(tvs, method, device="cpu")
    assert not torch.allclose(default["square.weight"], merged["square.weight"])


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
    ("method", "factor"), [("average", 1.0), ("task_arithmetic", 3.0), ("magmax", 1.0), ("iso_c", None)]
)
def test_identical_task_vectors_known_answers(method: str, factor: float | None) -> None:
    tv = _model(3)
    merged = merge_task_vectors([tv, tv, tv], method, device="cpu")
    if factor is not None:
        for key in tv:
            torch.testing.assert_close(merged[key], factor * tv[key], rtol=0, atol=1e-12)
    else:  # Iso-C of 3 copies: the copy's singular vectors with the mean of 3x its singular values
        U, S, Vh = torch.linalg.svd(tv["tall.weight"], full_matrices=False)
        torch.testing.assert_close(merged["tall.weight"], 3 * S.mean() * U @ Vh, rtol=0, atol=1e-10)


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
    ],
)
def test_bad_option_values(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_task_vectors([_model(0), _model(1)], method, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", DATA_FREE)
def test_cpu_and_cuda_agree(method: str) -> None:
    tvs = [_model(seed) for seed in range(3)]
    options = {"sign_convention": "canonical"} if method == "score" else {}
    cpu = merge_task_vectors(tvs, method, device="cpu", **options)
    cuda = merge_task_vectors(tvs, method, device="cuda", **options)
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=0, atol=1e-9 * max(1.0, cpu[key].abs().max().item()))
