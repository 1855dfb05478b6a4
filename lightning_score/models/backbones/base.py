"""The one small interface every CLIP backbone implements: :class:`Backbone`.

A backbone turns ``(model_name, pretrained, options)`` into :class:`~lightning_score.models.CLIPComponents`
whose ``model`` is a module with

- ``visual``: the image encoder, images ``[N, 3, H, W]`` → features ``[N, embed_dim]``; its ``state_dict()`` keys
  are the backbone's own (:mod:`lightning_score.models.convert`), and so the keys of its task vectors;
- ``encode_text(tokens)``: what ``tokenizer(prompts)`` gives → text features ``[N, embed_dim]`` (or, for a model
  without a text tower, a ``fixed_head`` attribute instead: ``(weight [classes, embed_dim], class names or None)``);
- ``logit_scale``: the log of the logit scale (a scalar).

It also says which modules FSDP shards one by one (:meth:`Backbone.block_types`) and which object of its own
library holds the weights, for an export (:meth:`Backbone.library_model`). A fourth backbone is one more file in
this folder, registered in :data:`lightning_score.models.backbones.BACKBONE_TYPES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lightning_score.models.factory import CLIPComponents, read_weights_metadata, resolve_builtin_weights
from lightning_score.utilities.files import cache_key, cache_root

__all__ = ["Backbone", "builtin_copy_folder", "clip_transforms"]


class Backbone(ABC):
    """A library's CLIP models, as lightning-score builds, trains, merges and exports them.

    Attributes:
        name: The backbone's name (``backbone:`` in a config): ``"open_clip"``, ``"hf"``, ``"timm"``.
        convention: Its key convention's name in :mod:`lightning_score.models.convert` (how its image tower's
            keys map to open_clip's; the merge's matrix convention comes from it).
        options: The keys :meth:`build` takes in ``backbone_options`` (others are refused by name).
    """

    name: ClassVar[str]
    convention: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    def check_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``backbone_options`` as a dict, refusing a key this backbone does not take."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = f"it takes {list(self.options)}" if self.options else "it takes none"
            raise ValueError(f"backbone_options {unknown} are not options of backbone '{self.name}': {takes}.")
        return options

    @abstractmethod
    def build(self, model_name: str, pretrained: str | None, options: Mapping[str, Any]) -> CLIPComponents:
        """The model (see the module docstring), its train/val transforms, tokenizer and labels, in eval mode.

        Args:
            model_name: What names the model in this library (an architecture, a folder, a hub id).
            pretrained: Where its weights come from (see each backbone).
            options: ``backbone_options``, checked by :meth:`check_options`.
        """

    @abstractmethod
    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The image tower's residual blocks: what FSDP shards (FSDP2) or wraps (FSDP1) one by one."""

    def set_grad_checkpointing(self, model: nn.Module) -> None:
        """Recompute the image encoder's activations in backward (open_clip's and timm's towers have this method)."""
        model.visual.set_grad_checkpointing(True)

    def fixed_parameters(self, visual: nn.Module) -> tuple[str, ...]:
        """The image encoder's parameters that fine-tuning leaves at their pre-trained values (none by default)."""
        return ()

    @abstractmethod
    def library_model(self, model: nn.Module) -> nn.Module:
        """The library's own model object holding ``model``'s weights (what :func:`~.export.export_model` takes)."""


def clip_transforms(
    size: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic"
) -> tuple[Any, Any]:
    """open_clip's train and val preprocessing at another library's size, mean and std.

    Every backbone preprocesses as open_clip does (the protocol's transforms: a random resized crop of scale
    0.9-1 for training; resize of the shortest side and centre crop for evaluation), with its own model's numbers,
    so that the same images reach the same network whichever library holds it.
    """
    from open_clip.transform import image_transform

    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    train = image_transform(size, is_train=True, mean=mean, std=std, interpolation=interpolation)
    val = image_transform(size, is_train=False, mean=mean, std=std, interpolation=interpolation)
    return train, val


_COPY_VERSION = 1


def builtin_copy_folder(library: str, token: str, model_name: str) -> Path:
    """The cache folder of ``library``'s copy of a built-in base model (``builtin:digits`` for ``model_name``).

    Keyed by the open_clip base's fingerprint: a rebuilt base gets a new copy. The base is built first if missing.
    """
    source = resolve_builtin_weights(token, model_name)
    fingerprint = read_weights_metadata(source).get("fingerprint", str(source))
    return cache_root() / f"{library}_copies" / cache_key(_COPY_VERSION, token, model_name, fingerprint)
