"""Hugging Face transformers' ``CLIPModel``: a ``save_pretrained`` folder or a hub id.

- ``model_name``: a local folder in ``save_pretrained`` layout (``config.json``, ``model.safetensors``, the
  tokenizer's files, ``preprocessor_config.json``) or a hub id such as ``"openai/clip-vit-base-patch32"`` (read
  through transformers' own ``from_pretrained``, so the hub cache and ``HF_HUB_OFFLINE`` work as usual).
- ``pretrained``: ``"builtin:digits"`` (``model_name`` then the tiny open_clip architecture, e.g.
  ``"tiny-ViT-W96-L3"``): a transformers copy of lightning-score's offline base, written into the cache once and
  read back through ``from_pretrained`` like any user's folder; ``None``: random weights of ``model_name``'s
  config; anything else (``"openai"``, the default): the weights in ``model_name``'s folder.

The image encoder is :class:`HFImageTower` (``vision_model`` and ``visual_projection`` of the ``CLIPModel``, the
same modules): its state-dict keys are the ``CLIPModel``'s own (``vision_model.encoder.layers.0.self_attn.q_proj
.weight``...), so a task vector of it loads into the user's model as it is. The head is built from the text
tower exactly as with open_clip (the same templates, the model's own tokenizer and logit scale).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_score.data.builtin import builtin_name
from lightning_score.models.backbones.base import Backbone, builtin_copy_folder, clip_transforms
from lightning_score.models.factory import CLIPComponents
from lightning_score.utilities.extras import require
from lightning_score.utilities.files import cache_lock

__all__ = ["HFCLIP", "HFBackbone", "HFImageTower"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def builtin_hf_copy(token: str, model_name: str) -> Path:
    """A transformers copy (``save_pretrained`` folder) of a built-in base model, written into the cache once.

    Exact (:func:`~lightning_score.models.hf_copy.save_hf_copy`: both towers, the tokenizer, the preprocessing),
    built under a lock, then read through ``CLIPModel.from_pretrained`` like any user's folder.
    """
    from lightning_score.models.factory import build_clip
    from lightning_score.models.hf_copy import save_hf_copy

    folder = builtin_copy_folder("hf", token, model_name)
    with cache_lock(f"hf-copy-{folder.name}"):
        if not (folder / "config.json").is_file():
            save_hf_copy(build_clip(model_name, token).model, folder, overwrite=True)
    return folder


class HFImageTower(nn.Module):
    """A ``CLIPModel``'s image half: ``visual_projection(vision_model(images).pooler_output)``.

    Args:
        clip: The ``CLIPModel``; its ``vision_model`` and ``visual_projection`` become this module's (shared).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, images: Tensor) -> Tensor:
        """Image features ``[N, projection_dim]`` (``CLIPModel.get_image_features``)."""
        return self.visual_projection(self.vision_model(pixel_values=images).pooler_output)


class HFCLIP(nn.Module):
    """A ``CLIPModel`` seen as lightning-score's models are: ``visual``, ``encode_text``, ``logit_scale``.

    The modules are the ``CLIPModel``'s own (its weights are shared, not copied): :attr:`library_model` is the
    user's ``CLIPModel`` with whatever was loaded or trained in it.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = HFImageTower(clip)
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.__dict__["library_model"] = clip

    def encode_text(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Text features of the tokenizer's output (``input_ids`` and ``attention_mask``)."""
        output = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return self.text_projection(output.pooler_output)


def _tokenizer(folder: str, context_length: int) -> Any:
    transformers = require("transformers", extra="hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    def tokenize(texts: list[str]) -> Any:
        return tokenizer(texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")

    return tokenize


def _image_settings(folder: str, image_size: int) -> tuple[int, tuple, tuple]:
    """Size, mean and std from the folder's ``preprocessor_config.json`` (CLIP's when it has none)."""
    transformers = require("transformers", extra="hf")
    try:
        processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    except OSError:
        return image_size, _OPENAI_MEAN, _OPENAI_STD
    crop = getattr(processor, "crop_size", None)  # a dict, or transformers 5's SizeDict
    height = crop.get("height") if isinstance(crop, Mapping) else getattr(crop, "height", crop)
    size = int(height) if height else image_size
    return size, tuple(processor.image_mean), tuple(processor.image_std)


class HFBackbone(Backbone):
    """transformers' ``CLIPModel`` (needs the ``hf`` extra)."""

    name = "hf"
    convention = "hf"

    def build(self, model_name: str, pretrained: str | None, options: Mapping[str, Any]) -> CLIPComponents:
        """``CLIPModel.from_pretrained(model_name)`` (see the module docstring for ``pretrained``)."""
        self.check_options(options)
        transformers = require("transformers", extra="hf")
        folder, label = model_name, "pretrained"
        if pretrained is not None and builtin_name(os.fspath(pretrained)) is not None:
            folder, label = str(builtin_hf_copy(pretrained, model_name)), os.fspath(pretrained)
        _check_folder(folder)
        if pretrained is None:
            config = transformers.CLIPConfig.from_pretrained(folder)
            clip, label = transformers.CLIPModel(config), "random"
        else:
            with _quiet_loading(transformers):
                clip = transformers.CLIPModel.from_pretrained(folder)
        model = HFCLIP(clip.eval())
        context = clip.config.text_config.max_position_embeddings
        size, mean, std = _image_settings(folder, clip.config.vision_config.image_size)
        train, val = clip_transforms(size, mean, std)
        name = model_name if label != "pretrained" else Path(folder).name if os.path.isdir(folder) else folder
        return CLIPComponents(model, train, val, _tokenizer(folder, context), f"hf:{name}/{label}", folder)

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """Transformers' ``CLIPEncoderLayer``."""
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        return (CLIPEncoderLayer,)

    def set_grad_checkpointing(self, model: nn.Module) -> None:
        """The ``CLIPModel``'s own gradient checkpointing (transformers', non-reentrant)."""
        clip = self.library_model(model)
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def library_model(self, model: nn.Module) -> nn.Module:
        """The ``CLIPModel`` (``HFCLIP.library_model``)."""
        return model.library_model  # type: ignore[return-value]


@contextlib.contextmanager
def _quiet_loading(transformers: Any) -> Iterator[None]:
    """No "Loading weights" bar on each read (a study reads the base for every merge); the setting restored after."""
    logging = transformers.utils.logging
    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _check_folder(folder: str) -> None:
    """A local path that is no ``save_pretrained`` folder of a CLIP model: one clear line, not transformers' trace."""
    path = Path(folder).expanduser()
    looks_local = path.exists() or folder.startswith((".", "/", "~")) or (os.sep in folder and not _hub_id(folder))
    if not looks_local:
        return
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone 'hf': '{folder}' is not a save_pretrained folder (it has no config.json). Pass the folder "
            "that CLIPModel.save_pretrained(folder) wrote, or a hub id such as 'openai/clip-vit-base-patch32'."
        )


def _hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()
