"""A float64 forward of open_clip's ViT image encoder written with plain tensor operations (tests only).

It records the input of every linear layer of every block, so the statistics MergeModule collects through
hooks (and recomputes for ``attn.out_proj``) can be checked against an independent computation. Its output
is checked against the encoder's own forward in the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: Tensor, quick: bool) -> Tensor:
    if quick:
        return x * torch.sigmoid(1.702 * x)
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def vit_forward(
    state: dict[str, Tensor], images: Tensor, heads: int, quick_gelu: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """Features ``[B, embed]`` and each block linear layer's inputs ``[B·tokens, width]``, in float64.

    Args:
        state: The image encoder's state dict (θ₀ + τ for an expert).
        images: ``[B, 3, H, W]``.
        heads: Attention heads per block.
        quick_gelu: The MLP's activation is QuickGELU (x·σ(1.702x)) instead of GELU.
    """
    s = {k: v.double() for k, v in state.items()}
    x = images.double()
    conv = s["conv1.weight"]  # [width, 3, p, p], stride p
    width, patch = conv.shape[0], conv.shape[-1]
    batch = x.shape[0]
    patches = x.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 3, H/p, W/p, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, 3 * patch * patch)
    tokens = patches @ conv.reshape(width, -1).T
    cls = s["class_embedding"].reshape(1, 1, width).expand(batch, 1, width)
    x = torch.cat([cls, tokens], dim=1) + s["positional_embedding"]
    x = _layer_norm(x, s["ln_pre.weight"], s["ln_pre.bias"])
    inputs: dict[str, Tensor] = {}
    head_dim = width // heads
    block = 0
    while f"transformer.resblocks.{block}.ln_1.weight" in s:
        p = f"transformer.resblocks.{block}."
        h = _layer_norm(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"])
        inputs[p + "attn.in_proj_weight"] = h.reshape(-1, width)
        qkv = h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]
        q, k, v = qkv.split(width, dim=-1)
        out = torch.zeros_like(q)
        for b in range(batch):
            for head in range(heads):
                cols = slice(head * head_dim, (head + 1) * head_dim)
                scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
                out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
        inputs[p + "attn.out_proj.weight"] = out.reshape(-1, width)
        x = x + out @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        h = _layer_norm(x, s[p + "ln_2.weight"], s[p + "ln_2.bias"])
        inputs[p + "mlp.c_fc.weight"] = h.reshape(-1, width)
        hidden = _gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"], quick_gelu)
        inputs[p + "mlp.c_proj.weight"] = hidden.reshape(-1, hidden.shape[-1])
        x = x + hidden @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
        block += 1
    pooled = _layer_norm(x[:, 0], s["ln_post.weight"], s["ln_post.bias"])
    return pooled @ s["proj"], inputs


def gram(x: Tensor) -> Tensor:
    """XᵀX / rows, summed entry by entry in float64."""
    x = x.double()
    return torch.einsum("ri,rj->ij", x, x) / x.shape[0]
