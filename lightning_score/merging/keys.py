"""Which keys a method treats as matrices, which matrices are a block's linear layers, and where merges compute.

* :func:`is_matrix_key`: the SVD-based methods' rule (the SCORE, TSV, Iso and ESM papers'): every 2-D entry of
  the image tower but ``text_projection``; the other keys get the mean over tasks.
* :func:`is_block_linear`: CART's, WUDI's and RegMean's released code treat only the linear layers of the
  transformer blocks specially (for an open_clip ViT: ``attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight``, ``mlp.c_proj.weight``); the other matrix keys (``positional_embedding``, ``proj``) are
  merged like the non-matrix keys.
* :func:`resolve_device`: the compute device of a merge.
"""

from __future__ import annotations

import torch

__all__ = ["is_block_linear", "is_matrix_key", "resolve_device"]


def is_matrix_key(key: str, shape: tuple[int, ...]) -> bool:
    """Return whether a key is a "matrix" for the SVD-based methods.

    ``ndim == 2 and "text_projection" not in key``: per transformer block ``attn.in_proj_weight``,
    ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``, plus ``positional_embedding``
    and ``proj``. Pass another predicate as ``merge_task_vectors(..., is_matrix=...)`` to change the rule.

    Example:
        >>> is_matrix_key("transformer.resblocks.0.attn.in_proj_weight", (2304, 768))
        True
        >>> is_matrix_key("conv1.weight", (768, 3, 32, 32)), is_matrix_key("text_projection", (512, 512))
        (False, False)
    """
    return len(shape) == 2 and "text_projection" not in key


def is_block_linear(key: str) -> bool:
    """Whether a 2-D key is a block's linear layer: "attn" or "mlp" in its name, and not a norm or a bias.

    Example:
        >>> is_block_linear("transformer.resblocks.3.mlp.c_fc.weight"), is_block_linear("positional_embedding")
        (True, False)
    """
    return ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: the given one, else CUDA when available, else CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
