"""The transformers and timm models that compute what an open_clip CLIP image tower computes.

``CLIPVisionModelWithProjection(hf_vision_config(visual))`` and
``timm.models.vision_transformer.VisionTransformer(**timm_vit_kwargs(visual))`` load the tower's state dict
converted by :func:`~lightning_score.models.convert.convert_state_dict` and give ``visual(images)`` (as
``image_embeds`` for transformers), up to float rounding. Same sizes, the same activation (GELU, or QuickGELU for
OpenAI's weights), LayerNorm of the same eps, pre-norm and class-token pooling.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from lightning_score.utilities.extras import require

__all__ = ["hf_vision_config", "timm_vit_kwargs"]


def _tower_settings(visual: nn.Module) -> dict[str, Any]:
    """An open_clip ``VisionTransformer``'s sizes and activation, refusing what the conversions do not cover."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"Expected an open_clip VisionTransformer (model.visual), got {type(visual).__name__}.")
    blocks = visual.transformer.resblocks
    first = blocks[0]
    plain = (
        visual.attn_pool is None
        and visual.pool_type == "tok"
        and isinstance(visual.ln_pre, nn.LayerNorm)
        and visual.proj is not None
        and all(isinstance(getattr(b, n), nn.Identity) for b in blocks for n in ("ls_1", "ls_2"))
        and isinstance(first.attn, nn.MultiheadAttention)
    )
    if not plain:
        raise ValueError(
            "This open_clip tower is not a plain CLIP ViT (class-token pooling, pre-norm, a projection, no layer "
            "scale, no attention pooling): transformers' CLIPVisionModel and timm's CLIP ViT have no equivalent."
        )
    return {
        "width": visual.conv1.out_channels,
        "patch_size": visual.conv1.kernel_size[0],
        "image_size": visual.image_size[0],
        "layers": len(blocks),
        "heads": first.attn.num_heads,
        "mlp_width": first.mlp.c_fc.out_features,
        "embed_dim": visual.proj.shape[1],
        "quick_gelu": isinstance(first.mlp.gelu, QuickGELU),
        "eps": visual.ln_pre.eps,
    }


def hf_vision_config(visual: nn.Module) -> Any:
    """The transformers ``CLIPVisionConfig`` of the same network as an open_clip image tower.

    ``CLIPVisionModelWithProjection(hf_vision_config(visual))`` loads ``convert_state_dict(visual.state_dict(),
    "open_clip", "hf")`` and computes ``visual(images)`` (as its ``image_embeds``). Needs the ``hf`` extra.
    """
    require("transformers", extra="hf")
    from transformers import CLIPVisionConfig

    s = _tower_settings(visual)
    return CLIPVisionConfig(
        hidden_size=s["width"],
        intermediate_size=s["mlp_width"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        image_size=s["image_size"],
        patch_size=s["patch_size"],
        projection_dim=s["embed_dim"],
        hidden_act="quick_gelu" if s["quick_gelu"] else "gelu",
        layer_norm_eps=s["eps"],
    )


def timm_vit_kwargs(visual: nn.Module) -> dict[str, Any]:
    """The keyword arguments of timm's ``VisionTransformer`` of the same network as an open_clip image tower.

    ``timm.models.vision_transformer.VisionTransformer(**timm_vit_kwargs(visual))`` loads
    ``convert_state_dict(visual.state_dict(), "open_clip", "timm")`` and computes ``visual(images)``; they are
    the settings of timm's ``vit_*_clip_*`` models (pre-norm, class-token pooling, LayerNorm of open_clip's eps,
    ``quick_gelu`` for OpenAI's weights), at the tower's sizes. Needs the ``timm`` extra for the model itself.
    """
    s = _tower_settings(visual)
    return {
        "img_size": s["image_size"],
        "patch_size": s["patch_size"],
        "embed_dim": s["width"],
        "depth": s["layers"],
        "num_heads": s["heads"],
        "mlp_ratio": s["mlp_width"] / s["width"],
        "num_classes": s["embed_dim"],
        "pre_norm": True,
        "class_token": True,
        "global_pool": "token",
        "qkv_bias": True,
        "norm_layer": functools.partial(nn.LayerNorm, eps=s["eps"]),
        "act_layer": "quick_gelu" if s["quick_gelu"] else "gelu",
    }
