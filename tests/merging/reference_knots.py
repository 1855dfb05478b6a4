"""Float64 reference of KnOTS (Stoica et al., ICLR 2025), written from its definition in docs/methods.md and the
authors' released code it cites (gstoica27/KnOTS at 01a940c: ``SVDMerger.apply_svd``/``merge``, ``masking_ops``),
read there, never copied. Plain loops, one task, one key and one entry at a time; no code shared with the package.
DARE's masks follow the package's documented contract (one CPU generator per (seed, key), float32 uniforms, an
entry kept when u ≥ p), re-derived in :mod:`tests.merging.reference_baselines`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tests.merging.reference_baselines import generator, is_matrix


def aligned_tasks(slices: list[Tensor], rank_tolerance: float = 1e-5) -> tuple[Tensor, list[Tensor]]:
    """U [m, ρ] and each task's Σ V_tᵀ [ρ, n] from the SVD of [Δ_1 | … | Δ_T], the triplets with σ ≤ tol dropped."""
    T = len(slices)
    m, n = slices[0].shape
    concatenated = torch.zeros(m, T * n, dtype=torch.float64)
    for t, delta in enumerate(slices):
        for j in range(n):
            concatenated[:, t * n + j] = delta[:, j].double()
    U, S, Vh = torch.linalg.svd(concatenated, full_matrices=False)
    kept = [i for i in range(S.shape[0]) if S[i].item() > rank_tolerance]
    basis = torch.zeros(m, len(kept), dtype=torch.float64)
    tasks = [torch.zeros(len(kept), n, dtype=torch.float64) for _ in range(T)]
    for row, i in enumerate(kept):
        basis[:, row] = U[:, i]
        for t in range(T):
            for j in range(n):
                tasks[t][row, j] = S[i] * Vh[i, t * n + j]
    return basis, tasks


def knots(
    task_vectors: list[dict[str, Tensor]],
    density: float = 0.2,
    merge: str = "ties",
    drop_rate: float = 0.0,
    seed: int = 0,
    rank_tolerance: float = 1e-5,
) -> dict[str, Tensor]:
    """Matrix keys: align, DARE, trim over every matrix key per task, merge, U times the merged block; others the mean."""
    T = len(task_vectors)
    out: dict[str, Tensor] = {}
    bases: dict[str, Tensor] = {}
    aligned: dict[str, list[Tensor]] = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        if not is_matrix(key, slices[0]):
            out[key] = sum(slices) / T
            continue
        bases[key], aligned[key] = aligned_tasks(slices, rank_tolerance)
        if drop_rate > 0.0:
            rows, n = aligned[key][0].shape
            draws = torch.rand((T, rows, n), generator=generator(seed, key), dtype=torch.float32).double()
            for t in range(T):
                for i in range(rows):
                    for j in range(n):
                        kept = draws[t, i, j].item() >= drop_rate
                        aligned[key][t][i, j] = aligned[key][t][i, j] / (1 - drop_rate) if kept else 0.0
    # flatten each task over every matrix key (the model's key order), as the authors' directions_to_reps
    flat = [[v for key in aligned for v in aligned[key][t].flatten().tolist()] for t in range(T)]
    P = len(flat[0]) if flat else 0
    trimmed = [list(row) for row in flat]
    if P:
        k = max(P - int(P * density), 1)
        for t in range(T):
            threshold = sorted(abs(v) for v in flat[t])[k - 1]
            trimmed[t] = [v if abs(v) >= threshold else 0.0 for v in flat[t]]
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    gamma = [sign(sum(trimmed[t][i] for t in range(T))) for i in range(P)]
    majority = sign(sum(gamma))
    merged = []
    for i in range(P):
        values = [trimmed[t][i] for t in range(T)]
        if merge == "sum":
            merged.append(sum(values))
        elif merge == "mean":
            merged.append(sum(values) / T)
        else:
            elected = gamma[i] if gamma[i] != 0 else majority
            chosen = [v for v in values if sign(v) == elected]
            merged.append(sum(chosen) / max(len(chosen), 1))
    start = 0
    for key, tasks in aligned.items():
        rows, n = tasks[0].shape
        block = torch.tensor(merged[start : start + rows * n], dtype=torch.float64).reshape(rows, n)
        start += rows * n
        out[key] = bases[key] @ block
    return {key: out[key] for key in task_vectors[0]}
