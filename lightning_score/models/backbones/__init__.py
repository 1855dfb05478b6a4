"""The CLIP backbones lightning-score builds, trains, merges and exports: open_clip, transformers, timm.

``backbone: open_clip | hf | timm`` in :class:`~lightning_score.CLIPExpert`, :class:`~lightning_score.MergeModule`,
the command line (``--model.backbone``) and a study chooses one; each is one file here behind the small
:class:`~lightning_score.models.backbones.base.Backbone` interface (image encoder, text side, preprocessing,
key convention, FSDP blocks, the library's own model for an export).

Example:
    >>> get_backbone("open_clip").name, sorted(BACKBONE_TYPES)
    ('open_clip', ['hf', 'open_clip', 'timm'])
"""

from __future__ import annotations

from lightning_score.models.backbones.base import Backbone, clip_transforms
from lightning_score.models.backbones.hf import HFBackbone
from lightning_score.models.backbones.open_clip import OpenCLIPBackbone
from lightning_score.models.backbones.timm import TimmBackbone

__all__ = ["BACKBONE_TYPES", "Backbone", "clip_transforms", "get_backbone"]

BACKBONE_TYPES: dict[str, type[Backbone]] = {b.name: b for b in (OpenCLIPBackbone, HFBackbone, TimmBackbone)}
"""The backbones by name; a fourth registers its :class:`Backbone` subclass here."""


def get_backbone(name: str) -> Backbone:
    """The backbone called ``name`` (``"open_clip"``, ``"hf"`` or ``"timm"``).

    Raises:
        ValueError: Another name, listing the choices.
    """
    try:
        return BACKBONE_TYPES[name]()
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}: use one of {sorted(BACKBONE_TYPES)}.") from None
