"""open_clip's CLIP models, the default backbone: :func:`~lightning_score.models.build_clip` as it always was.

``model_name`` an open_clip architecture (``"ViT-B-32"``, the tiny ``"tiny-ViT-W96-L3"``), ``pretrained`` an
open_clip tag, a local weights file, ``"builtin:digits"`` or ``None`` (see :mod:`lightning_score.models.factory`).
The model is open_clip's ``CLIP`` itself: ``model.visual`` is the image encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_score.models.backbones.base import Backbone
from lightning_score.models.factory import CLIPComponents, build_clip
from lightning_score.models.sharding import CLIP_BLOCKS

__all__ = ["OpenCLIPBackbone"]


class OpenCLIPBackbone(Backbone):
    """open_clip's ``CLIP``: built by :func:`~lightning_score.models.build_clip`, exported as it is."""

    name = "open_clip"
    convention = "open_clip"

    def build(self, model_name: str, pretrained: str | None, options: Mapping[str, Any]) -> CLIPComponents:
        """:func:`~lightning_score.models.build_clip` (no options)."""
        self.check_options(options)
        return build_clip(model_name, pretrained)

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """open_clip's ``ResidualAttentionBlock`` (:data:`~lightning_score.models.sharding.CLIP_BLOCKS`)."""
        return tuple(CLIP_BLOCKS)

    def library_model(self, model: nn.Module) -> nn.Module:
        """The ``CLIP`` itself."""
        return model
