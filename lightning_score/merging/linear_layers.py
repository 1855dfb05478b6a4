"""Which matrix keys are a transformer block's linear layers (for CART and WUDI).

CART's and WUDI's released code treat only the linear layers of the transformer blocks specially (for an
open_clip ViT: ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
``mlp.c_proj.weight``); the other matrix keys of the engine's rule (``positional_embedding``, ``proj``) are
merged like the non-matrix keys, by the mean.
"""

from __future__ import annotations

__all__ = ["is_block_linear"]


def is_block_linear(key: str) -> bool:
    """Whether a 2-D key is a block's linear layer: "attn" or "mlp" in its name, and not a norm or a bias.

    Example:
        >>> is_block_linear("transformer.resblocks.3.mlp.c_fc.weight"), is_block_linear("positional_embedding")
        (True, False)
    """
    return ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key
