"""timm's CLIP ViTs as the image encoder (``vit_base_patch32_clip_224.openai`` and kin).

- ``model_name``: a timm architecture (``timm.create_model(model_name, ...)``), with ``backbone_options:
  {model_args: {...}}`` passed on to it (sizes of a custom tower).
- ``pretrained``: a local weights file (``timm.create_model(model_name, pretrained=True,
  pretrained_cfg_overlay={"file": <file>})``, timm's own loading path); ``None``: random weights;
  ``"builtin:digits"`` (``model_name`` then the tiny open_clip architecture, e.g. ``"tiny-ViT-W96-L3"``): a timm
  copy of lightning-score's offline base, written into the cache once and loaded as a user's file; anything else
  (``"openai"``, the default): timm's own pretrained weights of ``model_name``'s tag, from its hub.

timm holds no text tower, so the zero-shot head comes from one of (``backbone_options``):

- ``text: {backbone: open_clip | hf, model_name: ..., pretrained: ...}``: the text tower of a matching CLIP of
  another library (the one the timm tower was taken from: ``ViT-B-32``/``openai`` for
  ``vit_base_patch32_clip_224.openai``); the head is then built from it exactly as for that library, with the
  same templates. The default for ``"builtin:digits"``: the open_clip base it was copied from.
- ``head: <file>``: a zero-shot head file, ``weight`` [classes, embed_dim] already scaled by the logit scale, such
  as an export's ``zero_shot_head.safetensors``; its class names, when it records them, must be the datamodule's.

The image encoder is the timm model itself: its state-dict keys (``blocks.0.attn.qkv.weight``, ``pos_embed``,
``head.weight``...) are the task vectors'. Its ``head`` is CLIP's projection (``num_classes`` = the embedding
size, a zero bias): lightning-score's tower converts to open_clip's exactly (:mod:`~lightning_score.models.convert`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_score.data.builtin import builtin_name
from lightning_score.models.backbones.base import Backbone, builtin_copy_folder, clip_transforms
from lightning_score.models.factory import CLIPComponents, WeightsUnavailableError, names_a_file
from lightning_score.utilities.extras import require
from lightning_score.utilities.files import atomic_write, atomic_write_text, cache_lock

__all__ = ["TimmBackbone", "TimmCLIP", "builtin_timm_copy"]


class TimmCLIP(nn.Module):
    """A timm image tower with a text side: ``visual`` (the timm model), ``encode_text``, ``logit_scale``.

    Args:
        visual: The timm ``VisionTransformer``.
        text: A CLIP of another backbone whose text tower encodes the prompts (its image tower is dropped), or
            ``None`` when the head is given (``fixed_head``).
        tokenizer: ``text``'s tokenizer.
        fixed_head: ``(weight [classes, dim], class names or None)`` from a head file, when there is no ``text``.
    """

    def __init__(
        self, visual: nn.Module, text: nn.Module | None, fixed_head: tuple[Tensor, list[str] | None] | None = None
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        if text is not None:
            text.visual = nn.Identity()  # only its text tower is used: the other image tower's memory back
            self.logit_scale = text.logit_scale
        self.fixed_head = fixed_head

    def encode_text(self, tokens: Any) -> Tensor:
        """The text tower's features (``text.encode_text``)."""
        if self.text is None:
            raise RuntimeError("This timm model has a fixed zero-shot head (backbone_options.head), no text tower.")
        return self.text.encode_text(tokens)


def builtin_timm_copy(token: str, model_name: str) -> tuple[str, dict[str, Any], Path]:
    """A timm copy of a built-in base model's image tower: ``(architecture, model_args, weights file)``.

    Converted exactly from the open_clip base (:func:`~lightning_score.models.convert.convert_state_dict`), written
    once into the cache (under a lock, atomically), then loaded by timm from the file like any user's weights.
    """
    from lightning_score.models.convert import convert_state_dict
    from lightning_score.models.factory import build_clip
    from lightning_score.models.tower_configs import timm_vit_kwargs

    folder = builtin_copy_folder("timm", token, model_name)
    weights, meta = folder / "model.safetensors", folder / "timm_model.json"
    with cache_lock(f"timm-copy-{folder.name}"):
        if not (weights.is_file() and meta.is_file()):
            visual = build_clip(model_name, token).model.visual
            kwargs = timm_vit_kwargs(visual)
            architecture = f"vit_base_patch32_clip_{'quickgelu_' if kwargs['act_layer'] == 'quick_gelu' else ''}224"
            args = {k: kwargs[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes")}
            args["mlp_ratio"] = kwargs["mlp_ratio"]
            converted = convert_state_dict(visual.state_dict(), "open_clip", "timm")
            tensors = {k: v.contiguous() for k, v in converted.items()}
            atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
            atomic_write_text(meta, json.dumps({"architecture": architecture, "model_args": args}, indent=2) + "\n")
    record = json.loads(meta.read_text())
    return record["architecture"], record["model_args"], weights


def _create(timm: Any, model_name: str, pretrained: str | None, model_args: dict[str, Any]) -> nn.Module:
    if pretrained is None:
        return timm.create_model(model_name, pretrained=False, **model_args)
    if names_a_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"backbone 'timm': weights file '{path}' does not exist.")
        overlay = {"file": str(path)}
        if "num_classes" in model_args:  # else timm drops a head whose size differs from the tag's
            overlay["num_classes"] = model_args["num_classes"]
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **model_args)
    try:
        return timm.create_model(model_name, pretrained=True, **model_args)
    except (OSError, RuntimeError) as error:
        raise WeightsUnavailableError(
            f"backbone 'timm': could not get timm's pretrained weights of '{model_name}' "
            f"({' '.join(str(error).split())}). On a machine without internet, pass the weights as a local file: "
            "pretrained=/path/to/model.safetensors."
        ) from error


def _read_head(path: str) -> tuple[Tensor, list[str] | None]:
    from safetensors import safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"backbone_options.head: zero-shot head file '{file}' does not exist.")
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata() or {}
        if "weight" not in handle.keys():  # noqa: SIM118  (a safe_open handle is no dict)
            raise ValueError(f"backbone_options.head: '{file}' holds no 'weight' tensor [classes, embed_dim].")
        weight = handle.get_tensor("weight")
    names = json.loads(header["classnames"]) if header.get("classnames") else None
    if weight.ndim != 2:
        raise ValueError(f"backbone_options.head: '{file}' has a weight of shape {tuple(weight.shape)}, not 2-D.")
    return weight.float(), names or None


class TimmBackbone(Backbone):
    """timm's CLIP ViT image towers (needs the ``timm`` extra); the head from a text tower or a file."""

    name = "timm"
    convention = "timm"
    options = ("model_args", "text", "head")

    def build(self, model_name: str, pretrained: str | None, options: Mapping[str, Any]) -> CLIPComponents:
        """``timm.create_model`` with the text side of ``options`` (see the module docstring)."""
        from lightning_score.models.backbones.hf import HFBackbone
        from lightning_score.models.backbones.open_clip import OpenCLIPBackbone

        options = self.check_options(options)
        timm = require("timm", extra="timm")
        model_args, text = dict(options.get("model_args") or {}), options.get("text")
        source = None if pretrained is None else os.fspath(pretrained)
        label = "random" if source is None else Path(source).name if names_a_file(source) else source
        architecture = model_name
        if source is not None and builtin_name(source) is not None:
            architecture, copy_args, path = builtin_timm_copy(source, model_name)
            model_args = {**copy_args, **model_args}
            text = text or {"backbone": "open_clip", "model_name": model_name, "pretrained": source}
            source, label = str(path), source
        if (text is None) == (options.get("head") is None):
            raise ValueError(
                "backbone 'timm' needs its zero-shot head from exactly one of backbone_options.text (a matching "
                "CLIP's text tower, e.g. {backbone: open_clip, model_name: ViT-B-32, pretrained: openai}) and "
                "backbone_options.head (a head file [classes, embed_dim]); got "
                f"{'both' if text is not None else 'neither'}."
            )
        texts: dict[str, type[Backbone]] = {"open_clip": OpenCLIPBackbone, "hf": HFBackbone}
        if text is not None:  # checked, like the head file, before any model is built
            text = dict(text)
            unknown = sorted(set(text) - {"backbone", "model_name", "pretrained", "backbone_options"})
            if unknown or "model_name" not in text:
                raise ValueError(
                    f"backbone_options.text {sorted(text)}: give model_name, and optionally backbone (open_clip or "
                    "hf), pretrained and backbone_options."
                )
            text_backbone = text.get("backbone", "open_clip")
            if text_backbone not in texts:
                raise ValueError(f"backbone_options.text.backbone: use one of {sorted(texts)} (a CLIP's text tower).")
        head = _read_head(options["head"]) if text is None else None
        visual = _create(timm, architecture, source, model_args).eval()
        if text is not None:
            parts = texts[text_backbone]().build(
                text["model_name"], text.get("pretrained"), text.get("backbone_options") or {}
            )
            model, tokenizer = TimmCLIP(visual, parts.model), parts.tokenizer
        else:
            model, tokenizer = TimmCLIP(visual, None, head), None
        cfg = dict(getattr(visual, "pretrained_cfg", None) or {})
        size = visual.patch_embed.img_size[0]
        train, val = clip_transforms(size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), "bicubic")
        return CLIPComponents(model.eval(), train, val, tokenizer, f"timm:{model_name}/{label}", source)

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The ViT ``Block`` of timm."""
        from timm.models.vision_transformer import Block

        return (Block,)

    def fixed_parameters(self, visual: nn.Module) -> tuple[str, ...]:
        """``head.bias``: CLIP's projection has none, so it stays at zero (the tower stays open_clip's network)."""
        head = getattr(visual, "head", None)
        return ("head.bias",) if getattr(head, "bias", None) is not None else ()

    def library_model(self, model: nn.Module) -> nn.Module:
        """The timm model (``TimmCLIP.visual``)."""
        return model.visual  # type: ignore[return-value]
