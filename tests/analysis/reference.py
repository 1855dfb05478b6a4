"""A float64 reference of the Subspace Alignment Ratio (spec section 2: loops over pairs, full SVDs) and inputs."""

from __future__ import annotations

import torch

from lightning_score import TaskVector


def reference_rank(delta: torch.Tensor, energy: float) -> int:
    """Smallest k whose leading singular values hold at least `energy` of ‖Δ‖_F²."""
    s = torch.linalg.svdvals(delta.double()).tolist()
    total = sum(v * v for v in s)
    if total == 0:
        return 0
    running = 0.0
    for k, v in enumerate(s, start=1):
        running += v * v
        if running >= energy * total:
            return k
    return len(s)


def reference_basis(basis: torch.Tensor, energy: float) -> torch.Tensor:
    """U_{:k}: the k leading left singular vectors from a full SVD of the basis task."""
    U, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)
    return U[:, : reference_rank(basis, energy)]


def reference_matrix(deltas: list[torch.Tensor], energy: float) -> torch.Tensor:
    """Every ordered pair (i = j included): row i = basis task, column j = projected task."""
    T = len(deltas)
    out = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        Uk = reference_basis(deltas[i], energy)
        projector = Uk @ Uk.T
        for j in range(T):
            other = deltas[j].double()
            out[i, j] = torch.linalg.norm(projector @ other) / torch.linalg.norm(other)
    return out


# --- inputs ---------------------------------------------------------------------------------------


def decaying(m: int, n: int, g: torch.Generator, decay: float) -> torch.Tensor:
    """A random m×n matrix with singular values decay**l, so that effective ranks vary between tasks."""
    r = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return (P * s) @ Q.T


def model(seed: int, dtype: torch.dtype = torch.float64, decay: float = 0.8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 3, 2, 2, generator=g).to(dtype),
        "positional_embedding": decaying(5, 8, g, decay).to(dtype),
        "transformer.resblocks.0.attn.in_proj_weight": decaying(24, 8, g, decay).to(dtype),
        "transformer.resblocks.0.attn.in_proj_bias": torch.randn(24, generator=g).to(dtype),
        "transformer.resblocks.0.mlp.c_proj.weight": decaying(8, 32, g, decay).to(dtype),
        "transformer.resblocks.1.mlp.c_fc.weight": decaying(16, 16, g, decay).to(dtype),
        "text_projection": torch.randn(8, 6, generator=g).to(dtype),
        "proj": decaying(8, 6, g, decay).to(dtype),
    }


MATRIX_KEYS = [  # depth order (embeddings, blocks, head), whatever the task vectors' own order
    "positional_embedding",
    "transformer.resblocks.0.attn.in_proj_weight",
    "transformer.resblocks.0.mlp.c_proj.weight",
    "transformer.resblocks.1.mlp.c_fc.weight",
    "proj",
]


def tasks(decays: tuple[float, ...] = (0.5, 0.7, 0.9)) -> list[TaskVector]:
    return [TaskVector(model(i, decay=d), {"name": f"d{i}", "domain": f"d{i}"}) for i, d in enumerate(decays)]


def orthonormal(m: int, g: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return Q
