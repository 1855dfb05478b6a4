"""Float64 references of the baselines added after the SCORE paper's table, written from the definitions of the
implementations each method's docs cite (read there, never copied; see docs/methods.md for repositories and
commits): DARE and DARE-TIES (MergeLM), Model Breadcrumbs (the authors' TaskVectorMiddleKeep), RandMix (the SCORE
authors' merge_rnd_mix), Model Stock (FusionBench's model_stock), CART (the authors' StaticMergeModule), WUDI
(the authors' decompose_task_vectors), RegMean (the authors' merger) and Fisher merging (Matena & Raffel's
merging.py). Plain loops, one task and one entry at a time, no code shared with the package. The seeded methods draw their randomness by the documented contract (one CPU
generator per (seed, key), seeded from BLAKE2b of "seed\\0key"; float32 uniforms for DARE, integers for
RandMix), re-derived here from hashlib and torch.Generator.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from tests.merging import reference

# --- seeded draws --------------------------------------------------------------------------------------


def generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def is_matrix(key: str, value: Tensor) -> bool:
    return value.ndim == 2 and "text_projection" not in key


def is_block_linear(key: str) -> bool:
    return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


# --- DARE (Yu et al., ICML 2024) -----------------------------------------------------------------------


def dare_vectors(task_vectors: list[dict[str, Tensor]], drop_rate: float, seed: int) -> list[dict[str, Tensor]]:
    """Each entry kept when its uniform draw u >= p, then divided by 1 − p."""
    T = len(task_vectors)
    out: list[dict[str, Tensor]] = [{} for _ in range(T)]
    for key in task_vectors[0]:
        shape = tuple(task_vectors[0][key].shape)
        draws = torch.rand((T, *shape), generator=generator(seed, key), dtype=torch.float32).double()
        for t in range(T):
            values = task_vectors[t][key].double().flatten().tolist()
            u = draws[t].flatten().tolist()
            kept = [v / (1 - drop_rate) if u[i] >= drop_rate else 0.0 for i, v in enumerate(values)]
            out[t][key] = torch.tensor(kept, dtype=torch.float64).reshape(shape)
    return out


def dare_ta(task_vectors: list[dict[str, Tensor]], drop_rate: float = 0.9, seed: int = 0) -> dict[str, Tensor]:
    dropped = dare_vectors(task_vectors, drop_rate, seed)
    return {key: sum(tv[key] for tv in dropped) for key in task_vectors[0]}


def dare_ties(
    task_vectors: list[dict[str, Tensor]],
    drop_rate: float = 0.9,
    density: float = 0.2,
    seed: int = 0,
    threshold: str = "mergelm",
) -> dict[str, Tensor]:
    """MergeLM: TIES on the dropped vectors, keeping |x| ≥ the int(P·m)-th smallest magnitude, m = 1 − density."""
    mask_rate = round(1 - density, 12) if threshold == "mergelm" else None
    return reference.ties(dare_vectors(task_vectors, drop_rate, seed), density, mask_rate=mask_rate)


# --- Model Breadcrumbs (Davari & Belilovsky, ECCV 2024) --------------------------------------------------


def _crumbs(values: list[float], keep: float, drop_top: float) -> list[float]:
    """Mask the int(n·drop_top) largest magnitudes, keep the next int(n·keep), mask the rest (stable ties)."""
    n = len(values)
    order = sorted(range(n), key=lambda i: -abs(values[i]))
    removed, kept = int(n * drop_top), int(n * keep)
    chosen = set(order[removed : removed + kept])
    return [v if i in chosen else 0.0 for i, v in enumerate(values)]


def breadcrumbs(
    task_vectors: list[dict[str, Tensor]], keep: float = 0.15, drop_top: float = 0.006, granularity: str = "row"
) -> dict[str, Tensor]:
    """The authors' TaskVectorMiddleKeep: per row of the last dimension, remove the top γ, keep the next β."""
    out = {}
    for key in task_vectors[0]:
        total = torch.zeros_like(task_vectors[0][key], dtype=torch.float64)
        for tv in task_vectors:
            value = tv[key].double()
            if granularity == "layer":
                masked = torch.tensor(_crumbs(value.flatten().tolist(), keep, drop_top), dtype=torch.float64)
            elif value.ndim == 0:
                masked = value
            else:
                rows = value.reshape(-1, value.shape[-1]).tolist()
                masked = torch.tensor([_crumbs(row, keep, drop_top) for row in rows], dtype=torch.float64)
            total += masked.reshape(value.shape)
        out[key] = total
    return out


# --- RandMix (Marczak et al., ECCV 2024) ---------------------------------------------------------------


def randmix(task_vectors: list[dict[str, Tensor]], seed: int = 0) -> dict[str, Tensor]:
    T = len(task_vectors)
    out = {}
    for key in task_vectors[0]:
        shape = tuple(task_vectors[0][key].shape)
        choice = torch.randint(0, T, shape, generator=generator(seed, key)).flatten().tolist()
        slices = [tv[key].double().flatten().tolist() for tv in task_vectors]
        out[key] = torch.tensor([slices[c][i] for i, c in enumerate(choice)], dtype=torch.float64).reshape(shape)
    return out


# --- Model Stock (Jang et al., ECCV 2024) --------------------------------------------------------------


def model_stock(
    task_vectors: list[dict[str, Tensor]], angle: str = "mean_angle", eps: float = 1e-8
) -> dict[str, Tensor]:
    """FusionBench: per key, t·mean with t = T·c/((T − 1)·c + 1 + ε), c = cos(mean pairwise angle in degrees),
    each cosine ⟨a, b⟩/(‖a‖‖b‖ + ε) clamped to [−1, 1]; ``angle="mean_cosine"``: c = the mean pairwise cosine."""
    T = len(task_vectors)
    out = {}
    for key in task_vectors[0]:
        vectors = [tv[key].double().flatten().tolist() for tv in task_vectors]
        mean = sum(tv[key].double() for tv in task_vectors) / T
        if T == 1:
            out[key] = mean
            continue
        cosines = []
        for i in range(T):
            for j in range(i + 1, T):
                dot = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True))
                norms = math.sqrt(sum(a * a for a in vectors[i])) * math.sqrt(sum(b * b for b in vectors[j])) + eps
                cosines.append(dot / norms if norms > 0 else 0.0)
        if angle == "mean_cosine":
            c = sum(cosines) / len(cosines)
        else:
            degrees = [math.degrees(math.acos(min(1.0, max(-1.0, x)))) for x in cosines]
            c = math.cos(math.radians(sum(degrees) / len(degrees)))
        denominator = (T - 1) * c + 1 + eps
        t = T * c / denominator if denominator > 0 else 0.0
        out[key] = t * mean
    return out


# --- CART (Choi et al., 2024) --------------------------------------------------------------------------


def cart(
    task_vectors: list[dict[str, Tensor]],
    rank_ratio: float = 0.12,
    coefficient: float = 2.0,
    all_matrices: bool = False,
) -> dict[str, Tensor]:
    """Block linear layers: mean + λ Σ_t (rank-k approximation of τ_t − mean); every other key: the mean."""
    T = len(task_vectors)
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        mean = sum(slices) / T
        if not (is_matrix(key, slices[0]) and (all_matrices or is_block_linear(key))):
            out[key] = mean
            continue
        k = max(1, int(rank_ratio * min(slices[0].shape)))
        low_rank = torch.zeros_like(mean)
        for delta in slices:
            U, S, Vh = torch.linalg.svd(delta - mean)
            for i in range(k):
                low_rank += S[i] * torch.outer(U[:, i], Vh[i])
        out[key] = mean + coefficient * low_rank
    return out


# --- WUDI (Cheng et al., ICML 2025) --------------------------------------------------------------------


def wudi_layer(slices: list[Tensor], iterations: int, lr: float) -> Tensor:
    """Adam (torch.optim, autograd) on L(M) = Σ_t ‖(M − τ_t) τ_tᵀ‖² / ‖τ_t‖² from M = Σ_t τ_t."""
    merged = torch.nn.Parameter(sum(s.double() for s in slices).clone())
    optimizer = torch.optim.Adam([merged], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=False)
    for _ in range(iterations):
        loss = sum(
            ((merged - tau.double()) @ tau.double().T).square().sum() / tau.double().square().sum()
            for tau in slices
            if tau.abs().sum() > 0
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def wudi(
    task_vectors: list[dict[str, Tensor]],
    iterations: int = 300,
    lr: float = 1e-5,
    all_matrices: bool = False,
    other_keys: str = "zero",
) -> dict[str, Tensor]:
    """The authors' decompose_task_vectors: the blocks' linear layers solved, every other key left at θ₀ (no
    update); ``other_keys="mean"`` with ``all_matrices`` is FusionBench's wudi_merging."""
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        if is_matrix(key, slices[0]) and (all_matrices or is_block_linear(key)):
            out[key] = wudi_layer(slices, iterations, lr)
        elif other_keys == "mean":
            out[key] = sum(slices) / len(slices)
        else:
            out[key] = torch.zeros_like(slices[0])
    return out


# --- data-using: RegMean (Jin et al., ICLR 2023), Fisher merging (Matena & Raffel, NeurIPS 2022) ---------


def regmean(
    task_vectors: list[dict[str, Tensor]], grams: list[dict[str, Tensor]], reduce_non_diagonal: float = 1.0
) -> dict[str, Tensor]:
    """W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹ on the FINE-TUNED weights W_t = W₀ + τ_t, minus W₀ (W₀ drawn at random here)."""
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        if key not in grams[0]:
            out[key] = sum(slices) / len(slices)
            continue
        base = torch.randn(slices[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        n = slices[0].shape[1]
        total = torch.zeros(n, n, dtype=torch.float64)
        weighted = torch.zeros_like(slices[0])
        for tau, task_grams in zip(slices, grams, strict=True):
            gram = task_grams[key].double().clone()
            for i in range(n):
                for j in range(n):
                    if i != j:
                        gram[i, j] *= reduce_non_diagonal
            total += gram
            weighted += (base + tau) @ gram
        out[key] = weighted @ torch.linalg.inv(total) - base
    return out


def fisher(
    task_vectors: list[dict[str, Tensor]],
    fishers: list[dict[str, Tensor]],
    fisher_floor: float = 1e-6,
    normalize_fishers: bool = True,
    favor_first_model: bool = True,
) -> dict[str, Tensor]:
    """Matena & Raffel's merging.py on the WEIGHTS θ_t = θ₀ + τ_t (θ₀ drawn at random here), minus θ₀:
    θ* = Σ_t λ_t d_t θ_t / Σ_t λ_t d_t, d_t = max(F_t, floor) for the first model (every model without
    favor_target_model), F_t otherwise; λ_t = 1/T, divided by the L2 norm of model t's whole Fisher when normalising."""
    T = len(task_vectors)
    coefficients = [1.0 / T] * T
    if normalize_fishers:
        for t in range(T):
            norm = math.sqrt(sum(sum(f * f for f in fishers[t][k].double().flatten().tolist()) for k in fishers[t]))
            if norm > 0:
                coefficients[t] /= norm
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double().flatten().tolist() for tv in task_vectors]
        shape = task_vectors[0][key].shape
        if key not in fishers[0]:
            out[key] = sum(tv[key].double() for tv in task_vectors) / T
            continue
        base = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).flatten().tolist()
        weights = []
        for t, task in enumerate(fishers):
            raw = task[key].double().flatten().tolist()
            floored = [max(f, fisher_floor) for f in raw] if (t == 0 or not favor_first_model) else raw
            weights.append([coefficients[t] * f for f in floored])
        merged = []
        for i in range(len(base)):
            numerator = sum(w[i] * (base[i] + s[i]) for w, s in zip(weights, slices, strict=True))
            merged.append(numerator / sum(w[i] for w in weights) - base[i])
        out[key] = torch.tensor(merged, dtype=torch.float64).reshape(shape)
    return out


MODEL_METHODS = {
    "dare_ta": dare_ta,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "randmix": randmix,
    "model_stock": model_stock,
    "cart": cart,
    "wudi": wudi,
}
