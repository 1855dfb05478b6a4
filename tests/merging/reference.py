"""Float64 reference implementations written straight from the papers (and, where a paper leaves a detail
open, from its authors' released code: TIES's and PCB's ranks, ESM's N < m basis), section by section.

Deliberately plain: one task and one entry at a time, full SVDs, Python loops for the statistics, no
code shared with the package. Every merged key is compared against these in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def polar(A: Tensor) -> Tensor:
    """polar(A) = P Qᵀ for the thin SVD A = P S Qᵀ."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def shared_basis(deltas: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Steps 1-3 of SCORE / TSV-M: U⊥, V⊥ᵀ and the concatenated singular values s_cat."""
    T = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = r // T
    U_cat = torch.zeros(m, r, dtype=torch.float64)
    Vh_cat = torch.zeros(r, n, dtype=torch.float64)
    s_cat = torch.zeros(r, dtype=torch.float64)
    for t, delta in enumerate(deltas):
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        for j in range(k):
            U_cat[:, t * k + j] = U[:, j]
            Vh_cat[t * k + j, :] = Vh[j, :]
            s_cat[t * k + j] = S[j]
    return polar(U_cat), polar(Vh_cat), s_cat


def score(deltas: list[Tensor], variant: str = "trimmed", z: float = 1.96, divide_by_tasks: bool = True) -> Tensor:
    """SCORE (Chaves et al., CVPR 2026), steps 1-7."""
    T = len(deltas)
    U_perp, Vh_perp, _ = shared_basis(deltas)
    r = U_perp.shape[1]
    total = torch.zeros(r, r, dtype=torch.float64)
    for delta in deltas:
        C = U_perp.T @ delta.double() @ Vh_perp.T
        off = C.clone()  # O_t
        for i in range(r):
            off[i, i] = 0.0
        values = off.flatten().tolist()
        mu = sum(values) / len(values)
        s = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
        h = z * s / T if divide_by_tasks else z * s
        trimmed = torch.zeros(r, r, dtype=torch.float64)
        diagonal = torch.zeros(r, r, dtype=torch.float64)
        for i in range(r):
            diagonal[i, i] = C[i, i]
            for j in range(r):
                if i != j and abs(off[i, j].item() - mu) <= h:
                    trimmed[i, j] = C[i, j]
        if variant == "trimmed":
            total += diagonal + trimmed
        elif variant == "diagonal":
            total += diagonal
        elif variant == "off_diagonal":
            total += trimmed
        elif variant == "full":
            total += C
        else:
            raise ValueError(variant)
    return U_perp @ total @ Vh_perp


# --- TSV-M and Iso (Gargiulo et al. 2025; Marczak et al. 2025) ------------------------------------------


def tsv(deltas: list[Tensor]) -> Tensor:
    """TSV-M: U⊥ diag(s_cat) V⊥ᵀ."""
    U_perp, Vh_perp, s_cat = shared_basis(deltas)
    return U_perp @ torch.diag(s_cat) @ Vh_perp


def iso_c(deltas: list[Tensor]) -> Tensor:
    total = sum(d.double() for d in deltas)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    return S.mean() * U @ Vh


def iso_cts(deltas: list[Tensor], common_fraction: float = 0.8) -> Tensor:
    T = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    c0 = math.floor(common_fraction * r)
    p = round((r - c0) / T)
    c = r - T * p
    total = sum(d.double() for d in deltas)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    U_c, S_c, Vh_c = U[:, :c], S[:c], Vh[:c]
    u_blocks, s_blocks, v_blocks = [], [], []
    for delta in deltas:
        residual = delta.double() - U_c @ U_c.T @ delta.double()
        Ut, St, Vht = torch.linalg.svd(residual, full_matrices=False)
        u_blocks.append(Ut[:, :p])
        s_blocks.append(St[:p])
        v_blocks.append(Vht[:p])
    U_cat = torch.cat([*u_blocks, U_c], dim=1)
    s_cat = torch.cat([*s_blocks, S_c])
    Vh_cat = torch.cat([*v_blocks, Vh_c], dim=0)
    return s_cat.mean() * polar(U_cat) @ polar(Vh_cat)


# --- whole-model methods (TIES, MagMax, PCB), on the flattened T×P matrix -------------------------------


def flatten(task_vectors: list[dict[str, Tensor]]) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    layout = [(key, task_vectors[0][key].shape) for key in task_vectors[0]]
    flat = torch.stack([torch.cat([tv[key].double().flatten() for key, _ in layout]) for tv in task_vectors])
    return flat, layout


def unflatten(vector: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    out, start = {}, 0
    for key, shape in layout:
        size = math.prod(shape)
        out[key] = vector[start : start + size].reshape(shape)
        start += size
    return out


def ties(
    task_vectors: list[dict[str, Tensor]], density: float = 0.2, mask_rate: float | None = None
) -> dict[str, Tensor]:
    """Yadav et al. 2023 as the authors' code ranks: threshold = the k-th smallest |τ_t|, k = P − int(P·K).

    With ``mask_rate`` m, MergeLM's ``ties_merging`` rank instead: k = int(P·m) (``mask_smallest_magnitude_param_values``).
    """
    flat, layout = flatten(task_vectors)
    T, P = flat.shape
    k = max(P - int(P * density), 1) if mask_rate is None else max(int(P * mask_rate), 1)  # k = 0: keep everything
    trimmed = torch.zeros_like(flat)
    for t in range(T):
        threshold = sorted(abs(x) for x in flat[t].tolist())[k - 1]
        for i in range(P):
            if abs(flat[t, i].item()) >= threshold:
                trimmed[t, i] = flat[t, i]
    gamma = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(gamma.sum())
    gamma[gamma == 0] = majority
    merged = torch.zeros(P, dtype=torch.float64)
    for i in range(P):
        chosen = [trimmed[t, i].item() for t in range(T) if torch.sign(trimmed[t, i]) == gamma[i]]
        merged[i] = sum(chosen) / max(len(chosen), 1)
    return unflatten(merged, layout)


def magmax(task_vectors: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    flat, layout = flatten(task_vectors)
    T, P = flat.shape
    merged = torch.zeros(P, dtype=torch.float64)
    for i in range(P):
        best = 0
        for t in range(T):
            if abs(flat[t, i].item()) >= abs(flat[best, i].item()):  # ties go to the later task
                best = t
        merged[i] = flat[best, i]
    return unflatten(merged, layout)


def pcb(task_vectors: list[dict[str, Tensor]], ratio: float = 0.05, clip: float = 0.01) -> dict[str, Tensor]:
    """Du et al. 2024 with the authors' indices: s sorted ascending, 0-indexed, int() of Python floats."""
    flat, layout = flatten(task_vectors)
    T, P = flat.shape
    clipped = torch.zeros_like(flat)
    a = torch.zeros_like(flat)
    for t in range(T):
        s = sorted(flat[t].abs().tolist())
        low, high = s[int(P * clip)], s[int(P * (1 - clip) - 1)]
        magnitude = flat[t].abs().clamp(low, high)
        clipped[t] = torch.sign(flat[t]) * magnitude
        a[t] = (magnitude - magnitude.min()) / (magnitude.max() - magnitude.min())
    nu = torch.sign(flat) * a
    weights = torch.zeros_like(flat)
    for t in range(T):
        intra = torch.exp(T * a[t] ** 2)
        inter = sum(torch.tanh(nu[t] * nu[j]) for j in range(T))
        beta = intra * inter
        floor = sorted(beta.tolist())[int(P * (1 - ratio))]
        beta = beta.clamp(min=floor)
        weights[t] = (beta - beta.min()) / (beta.max() - beta.min())
    merged = (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-12)
    return unflatten(merged, layout)


# --- a whole model -------------------------------------------------------------------------------------

MATRIX_METHODS = {"score": score, "tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts}
MODEL_METHODS = {
    "ties": ties,
    "magmax": magmax,
    "pcb": pcb,
    "task_arithmetic": lambda tvs: {k: sum(tv[k].double() for tv in tvs) for k in tvs[0]},
    "average": lambda tvs: {k: sum(tv[k].double() for tv in tvs) / len(tvs) for k in tvs[0]},
}


def merge_model(task_vectors: list[dict[str, Tensor]], method: str, **options: object) -> dict[str, Tensor]:
    """Matrix keys (2-D, not text_projection) by the method, the rest by the mean; whole-model methods whole."""
    from tests.merging.reference_baselines import MODEL_METHODS as BASELINES  # imports this module
    from tests.merging.reference_knots import knots

    if method == "knots":
        return knots(task_vectors, **options)
    if method in BASELINES:
        return BASELINES[method](task_vectors, **options)
    if method in MODEL_METHODS:
        return MODEL_METHODS[method](task_vectors, **options)
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        if slices[0].ndim == 2 and "text_projection" not in key:
            out[key] = MATRIX_METHODS[method](slices, **options)
        else:
            out[key] = sum(slices) / len(slices)
    return out


# --- ESM (Li, Qi, Tian, Geng), data-dependent, as the authors' released code computes it ----------------

ESM_LAYER_TYPES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def esm_basis(delta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors P (m×m) and eigenvalues of the uncentred PCA of ΔO = X Δᵀ, sorted by eigenvalue (descending).

    With fewer than m directions (N < m), the basis is the identity with its first N' columns replaced by the
    principal directions, and the eigenvalues are padded with zeros, as in the authors' code.
    """
    m = delta.shape[0]
    shift = x.double() @ delta.double().T  # N×m
    _, sv, Vh = torch.linalg.svd(shift, full_matrices=False)
    P = torch.eye(m, dtype=torch.float64)
    lam = torch.zeros(m, dtype=torch.float64)
    for i in range(Vh.shape[0]):
        P[:, i] = Vh[i]
        lam[i] = sv[i] ** 2 / (x.shape[0] - 1)
    order = sorted(range(m), key=lambda i: -lam[i].item())  # stable
    return P[:, order], lam[order]


def esm_layer(deltas: list[Tensor], inputs: list[Tensor], power: float = 0.15) -> Tensor:
    """Polarized merging of one target layer; the layer-type scaling comes after all layers."""
    T = len(deltas)
    m = deltas[0].shape[0]
    r = int(m * (1 / T))
    us, vs, a = [], [], []
    for delta, x in zip(deltas, inputs, strict=True):
        P, lam = esm_basis(delta, x)
        full = P.T @ delta.double()  # all m rows, before truncation
        a.append(math.sqrt(sum(value**2 for value in full.flatten().tolist())))
        kept = lam[:r]
        e = (kept / kept.mean()) ** power
        e = e / e.mean()
        us.append(P[:, :r] @ torch.diag(e))
        vs.append(torch.diag(e) @ full[:r])
    a_bar = sum(a) / T
    vs = [v * (a_t / a_bar) ** 2 for v, a_t in zip(vs, a, strict=True)]
    U_cat = torch.cat(us, dim=1)
    V_cat = torch.cat(vs, dim=0)
    g = torch.tensor([torch.linalg.norm(V_cat[:, j]).item() for j in range(V_cat.shape[1])], dtype=torch.float64)
    V_cat = V_cat @ torch.diag((g / g.mean()) ** 2)
    U_o = polar(U_cat) * torch.linalg.svd(U_cat)[1].mean()
    V_o = polar(V_cat) * torch.linalg.svd(V_cat)[1].mean()
    return 2 * U_o @ V_o


def esm(
    task_vectors: list[dict[str, Tensor]], activations: list[dict[str, Tensor]], alpha: float = 1.0
) -> dict[str, Tensor]:
    targets = list(activations[0])
    out = {}
    for key in task_vectors[0]:
        slices = [tv[key].double() for tv in task_vectors]
        if key in targets:
            out[key] = esm_layer(slices, [acts[key] for acts in activations])
        elif slices[0].ndim == 2 and "text_projection" not in key:
            out[key] = tsv(slices)
        else:
            out[key] = sum(slices) / len(slices)
    for layer_type in ESM_LAYER_TYPES:  # every key of the type, the TSV-merged out_proj layers included
        keys = [k for k in out if layer_type in k]
        if not keys:
            continue
        mean_norm = sum(torch.linalg.norm(out[k]).item() for k in keys) / len(keys)
        for k in keys:
            out[k] = out[k] * (torch.linalg.norm(out[k]).item() / mean_norm) ** 2
    for k in targets:  # α multiplies only the target layers
        out[k] = alpha * out[k]
    return out
