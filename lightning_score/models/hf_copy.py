"""A whole open_clip CLIP (image and text tower) as a Hugging Face transformers ``CLIPModel`` folder, exactly.

:func:`save_hf_copy` writes what ``transformers.CLIPModel.from_pretrained(folder)``,
``AutoTokenizer.from_pretrained(folder)`` and ``CLIPImageProcessor.from_pretrained(folder)`` load offline:
``save_pretrained``'s ``config.json`` and ``model.safetensors``, the tokenizer files (:func:`write_clip_tokenizer`)
and ``preprocessor_config.json``. ``get_image_features`` and ``get_text_features`` of the copy are
``encode_image`` and ``encode_text`` of the open_clip model up to float rounding, and its tokenizer gives
open_clip's token ids up to and including the end-of-text token (it pads with end-of-text, open_clip with 0;
the causal mask makes that padding irrelevant to the features).

The image tower converts by :func:`~lightning_score.models.convert.convert_state_dict`; the text tower's keys
(:data:`TEXT_RULES`, top-level keys of open_clip's ``CLIP``) are:

==============================  ====================================================
open_clip ``CLIP``              transformers ``CLIPModel``
==============================  ====================================================
``token_embedding.weight``      ``text_model.embeddings.token_embedding.weight``
``positional_embedding``        ``text_model.embeddings.position_embedding.weight``
``B.ln_1.*``, ``B.ln_2.*``      ``L.layer_norm1.*``, ``L.layer_norm2.*``
``B.attn.in_proj_*`` [3d, …]    ``L.self_attn.{q,k,v}_proj.*`` 3×[d, …]
``B.attn.out_proj.*``           ``L.self_attn.out_proj.*``
``B.mlp.c_fc.*``, ``c_proj``    ``L.mlp.fc1.*``, ``fc2``
``ln_final.*``                  ``text_model.final_layer_norm.*``
``text_projection`` [d, e]      ``text_projection.weight`` [e, d] (ᵀ)
``logit_scale``                 ``logit_scale``
==============================  ====================================================

(``B`` is ``transformer.resblocks.{i}``, ``L`` is ``text_model.encoder.layers.{i}``.) Any text tower but open_clip's
plain one (a Hugging Face text encoder, no causal mask, other pooling, layer scale) is refused by name.

open_clip pools the largest token id (the end-of-text token), transformers the first ``eos_token_id`` (that
token): the same position whenever a sequence holds one, as both tokenizers write. transformers' tokenizer runs no
``ftfy``/HTML-unescaping: a prompt with HTML entities or broken Unicode may tokenize otherwise.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lightning_score.models.convert as convert
from lightning_score.models.convert import KeyRule, affine_rules, convert_state_dict, key_pattern
from lightning_score.models.tower_configs import hf_vision_config
from lightning_score.utilities.extras import require
from lightning_score.utilities.files import atomic_write, atomic_write_text, publish_folder

__all__ = [
    "TEXT_RULES",
    "hf_clip_config",
    "hf_clip_from_open_clip",
    "hf_image_processor_config",
    "hf_text_config",
    "hf_text_state_dict",
    "save_hf_copy",
    "write_clip_tokenizer",
]

_OC = "transformer.resblocks.{i}"
_HF = "text_model.encoder.layers.{i}"

TEXT_RULES: tuple[KeyRule, ...] = (
    KeyRule("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
    KeyRule("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    *affine_rules(f"{_OC}.ln_1", f"{_HF}.layer_norm1"),
    convert.qkv_split_rule(f"{_OC}.attn.in_proj_weight", f"{_HF}.self_attn.{{p}}_proj.weight"),
    convert.qkv_split_rule(f"{_OC}.attn.in_proj_bias", f"{_HF}.self_attn.{{p}}_proj.bias"),
    *affine_rules(f"{_OC}.attn.out_proj", f"{_HF}.self_attn.out_proj"),
    *affine_rules(f"{_OC}.ln_2", f"{_HF}.layer_norm2"),
    *affine_rules(f"{_OC}.mlp.c_fc", f"{_HF}.mlp.fc1"),
    *affine_rules(f"{_OC}.mlp.c_proj", f"{_HF}.mlp.fc2"),
    *affine_rules("ln_final", "text_model.final_layer_norm"),
    convert.transposed_rule("text_projection", "text_projection.weight"),
    KeyRule("logit_scale", ("logit_scale",), lambda t: (t.reshape(()),), lambda ts: ts[0]),
)
"""The open_clip ``CLIP`` text keys (and ``logit_scale``) and their ``CLIPModel`` keys."""

_HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_OPEN_CLIP_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's numbers, as transformers' configs hold them


def _plain_block(block: nn.Module) -> bool:
    """Whether a text block is open_clip's plain ``ResidualAttentionBlock`` (no layer scale, self-attention)."""
    attn = getattr(block, "attn", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and not hasattr(block, "ln_1_kv")
        and all(isinstance(getattr(block, n, None), nn.Identity) for n in ("ls_1", "ls_2"))
        and isinstance(attn, nn.MultiheadAttention)
        and attn.in_proj_weight is not None
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def _text_settings(model: nn.Module) -> dict[str, Any]:
    """The ``CLIPTextConfig`` arguments of an open_clip text transformer; refuses (by name) what has no equivalent."""
    from open_clip.transformer import QuickGELU

    if not all(hasattr(model, n) for n in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise ValueError(
            f"This {type(model).__name__} has no built-in open_clip text transformer (its text tower is "
            f"{type(getattr(model, 'text', None)).__name__}, e.g. a Hugging Face text encoder): only open_clip's "
            "CLIP with its standard text transformer converts to transformers' CLIPTextModel."
        )
    blocks = list(model.transformer.resblocks)
    width, context = model.token_embedding.embedding_dim, model.positional_embedding.shape[0]
    mask = getattr(model, "attn_mask", None)
    causal = torch.full((context, context), float("-inf")).triu(1)
    norms = [model.ln_final, *(n for b in blocks for n in (getattr(b, "ln_1", None), getattr(b, "ln_2", None)))]
    acts = [getattr(getattr(b, "mlp", None), "gelu", None) for b in blocks]
    quick = all(isinstance(a, QuickGELU) for a in acts)
    pool, eos = getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    projection = getattr(model, "text_projection", None)
    plain_mask = mask is not None and tuple(mask.shape) == (context, context)
    gelu = all(type(a) is nn.GELU and a.approximate == "none" for a in acts)
    problems = {
        "no causal attention mask": not (plain_mask and torch.equal(mask.detach().cpu().float(), causal)),
        f"text pooling {pool!r} (not 'argmax', nor 'eos' with an eos id other than 2)": not (
            pool == "argmax" or (pool == "eos" and eos is not None and eos != 2)
        ),
        "a text projection that is no [width, embed_dim] matrix (none, or with a bias)": not (
            isinstance(projection, nn.Parameter) and projection.ndim == 2
        ),
        "a logit bias (SigLIP-style)": getattr(model, "logit_bias", None) is not None,
        "blocks other than open_clip's ResidualAttentionBlock (layer scale, cross or custom attention)": not all(
            map(_plain_block, blocks)
        ),
        "an activation other than exact GELU or QuickGELU": not (quick or gelu),
        "norms other than LayerNorm with a bias and one eps": not all(
            isinstance(n, nn.LayerNorm) and n.bias is not None and n.eps == model.ln_final.eps for n in norms
        ),
    }
    found = [reason for reason, bad in problems.items() if bad]
    if found:
        raise ValueError(
            f"This open_clip text tower is not the plain CLIP text transformer: {'; '.join(found)}. transformers' "
            "CLIPTextModel has no equivalent, so no exact Hugging Face copy can be made."
        )
    vocab, eot = model.token_embedding.num_embeddings, model.token_embedding.num_embeddings - 1
    eot = eot if pool == "argmax" else int(eos)
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": blocks[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "max_position_embeddings": context,
        "projection_dim": projection.shape[1],
        "hidden_act": "quick_gelu" if quick else "gelu",
        "layer_norm_eps": model.ln_final.eps,
        "bos_token_id": eot - 1,
        "eos_token_id": eot,
        "pad_token_id": eot,
    }


def hf_text_config(model: nn.Module) -> Any:
    """The transformers ``CLIPTextConfig`` of the same network as an open_clip ``CLIP``'s text transformer.

    ``eos_token_id`` is the end-of-text id that open_clip pools (the last id of the vocabulary for its ``argmax``
    pooling), so ``CLIPTextModel`` pools the same position; ``bos_token_id`` is the id before it (open_clip's
    start-of-text) and ``pad_token_id`` the end-of-text id, as transformers' CLIP tokenizer pads. Needs the ``hf``
    extra.

    Raises:
        ValueError: A text tower that is not the plain one (the reasons named).
    """
    require("transformers", extra="hf")
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**_text_settings(model))


def hf_clip_config(model: nn.Module) -> Any:
    """The transformers ``CLIPConfig`` of a whole open_clip ``CLIP`` (both towers, its embedding size, logit scale)."""
    require("transformers", extra="hf")
    from transformers import CLIPConfig

    text, vision = hf_text_config(model), hf_vision_config(model.visual)  # open_clip's CLIP: one embed_dim
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=text.projection_dim,
        logit_scale_init_value=float(model.logit_scale.detach().reshape(-1)[0]),
    )


def hf_text_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The text tower's (and ``logit_scale``'s) tensors of an open_clip ``CLIP`` under ``CLIPModel``'s keys.

    Exact: renames, the q/k/v split and the projection's transpose; dtypes kept.

    Raises:
        ValueError: A text tower that is not the plain one, or a key :data:`TEXT_RULES` does not know (named).
    """
    _text_settings(model)
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("visual."):
            continue
        for rule in TEXT_RULES:
            found = key_pattern(rule.open_clip).fullmatch(key)
            if found is not None:
                names = [t.replace("{i}", found.groupdict().get("i") or "") for t in rule.keys]
                out.update(zip(names, rule.to_backbone(tensor.detach()), strict=True))
                break
        else:
            raise ValueError(
                f"Key {key!r} is no key of open_clip's plain CLIP text tower (such as "
                f"{[r.open_clip for r in TEXT_RULES][:3]}): no exact Hugging Face copy can be made."
            )
    return out


def hf_clip_from_open_clip(model: nn.Module) -> Any:
    """A transformers ``CLIPModel`` with exactly an open_clip ``CLIP``'s weights (on the CPU, in eval mode).

    Args:
        model: An open_clip ``CLIP`` with a plain ViT image tower and the standard text transformer.

    Returns:
        The ``CLIPModel``, in the open_clip model's dtype; its ``get_image_features``/``get_text_features`` are the
        model's ``encode_image``/``encode_text`` up to float rounding.

    Raises:
        ValueError: A tower that is not the plain one (the reason named).
    """
    require("transformers", extra="hf")
    from transformers import CLIPModel

    config = hf_clip_config(model)
    state = {**convert_state_dict(model.visual.state_dict(), "open_clip", "hf"), **hf_text_state_dict(model)}
    hf = CLIPModel(config).to(model.token_embedding.weight.dtype)
    missing, unexpected = hf.load_state_dict({k: v.to("cpu") for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k not in _HF_IGNORED]
    if missing or unexpected:  # a transformers whose CLIPModel is laid out otherwise
        raise RuntimeError(f"transformers' CLIPModel did not take the converted weights: {missing=} {unexpected=}.")
    return hf.eval()


def write_clip_tokenizer(folder: str | Path, tokenizer: Any = None) -> Path:
    """Write transformers' CLIP tokenizer files of an open_clip ``SimpleTokenizer`` into ``folder``.

    ``vocab.json`` and ``merges.txt`` (open_clip's encoder and BPE ranks, its ``<start_of_text>`` and
    ``<end_of_text>`` named ``<|startoftext|>`` and ``<|endoftext|>`` as transformers names them),
    ``tokenizer_config.json`` (``model_max_length`` the tokenizer's context length) and what transformers'
    ``save_pretrained`` adds (``tokenizer.json``, special tokens). ``AutoTokenizer.from_pretrained(folder)`` gives
    open_clip's ids up to and including end-of-text (``truncation=True`` truncates as open_clip does). Each file
    is written atomically.

    Args:
        folder: Where to write (created if missing).
        tokenizer: An open_clip ``SimpleTokenizer`` (default: open_clip's, context length 77).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: A tokenizer of another kind, or one that cleans, reduces or adds special tokens otherwise.
    """
    require("transformers", extra="hf")
    from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
    from transformers import AutoTokenizer

    tokenizer = SimpleTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tokenizer, SimpleTokenizer):
        raise ValueError(f"Expected open_clip's SimpleTokenizer (OpenAI's BPE), got {type(tokenizer).__name__}.")
    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    if (
        specials != list(_OPEN_CLIP_SPECIALS)
        or tokenizer.clean_fn is not get_clean_fn("lower")
        or tokenizer.reduction_fn is not None
    ):
        raise ValueError(
            f"This SimpleTokenizer (special tokens {specials}, cleaning {tokenizer.clean_fn.__name__}, reduction "
            f"{tokenizer.reduction_fn}) is not CLIP's plain one (two special tokens, lower-case cleaning, truncation): "
            "transformers' CLIPTokenizer would tokenize otherwise."
        )
    vocab = {_OPEN_CLIP_SPECIALS.get(k, k): v for k, v in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    bos, eos = _OPEN_CLIP_SPECIALS.values()
    specials_map = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length, **specials_map}
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
        (tmp / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2), encoding="utf-8")
        AutoTokenizer.from_pretrained(str(tmp)).save_pretrained(str(tmp))  # adds tokenizer.json (fast tokenizer)
        for path in sorted(tmp.iterdir()):
            atomic_write(folder / path.name, lambda out, path=path: shutil.copyfile(path, out))
    return folder


def hf_image_processor_config(visual: nn.Module) -> dict[str, Any]:
    """The ``CLIPImageProcessor`` settings of open_clip's evaluation preprocessing of an image tower.

    From ``visual.preprocess_cfg`` (open_clip's defaults where it has none): resize the shorter side to the image
    size and centre-crop it (``resize_mode`` ``"shortest"``), or resize to it (``"squash"``); open_clip's
    interpolation, mean and std; RGB.

    Raises:
        ValueError: A preprocessing ``CLIPImageProcessor`` cannot do (``"longest"`` padding, a non-square crop, a
            mode other than RGB, an unknown interpolation).
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    resize, mode = cfg.get("resize_mode", "shortest"), cfg.get("mode", "RGB")
    interpolation = cfg.get("interpolation", "bicubic")
    if resize not in ("shortest", "squash") or mode != "RGB" or interpolation not in _RESAMPLE:
        raise ValueError(
            f"open_clip's preprocessing (resize_mode {resize!r}, mode {mode!r}, interpolation {interpolation!r}) has "
            "no CLIPImageProcessor equivalent: it resizes (shortest side or squash), in RGB, nearest/bilinear/bicubic."
        )
    if resize == "shortest" and height != width:
        raise ValueError(f"A non-square image size {(height, width)} with resize_mode 'shortest' is not supported.")
    crop = resize == "shortest"
    return {
        "do_resize": True,
        "size": {"shortest_edge": height} if crop else {"height": height, "width": width},
        "resample": _RESAMPLE[interpolation],
        "do_center_crop": crop,
        "crop_size": {"height": height, "width": width},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in cfg.get("mean", OPENAI_DATASET_MEAN)],
        "image_std": [float(x) for x in cfg.get("std", OPENAI_DATASET_STD)],
        "do_convert_rgb": True,
    }


def save_hf_copy(model: nn.Module, folder: str | Path, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write an open_clip ``CLIP`` as a transformers ``CLIPModel`` folder with its tokenizer and preprocessor.

    ``config.json`` and ``model.safetensors`` (``save_pretrained``), the tokenizer files
    (:func:`write_clip_tokenizer`) and ``preprocessor_config.json`` (:func:`hf_image_processor_config`). The
    folder is built under a temporary name beside ``folder`` and renamed (an interrupted write leaves nothing
    at ``folder``).

    Args:
        model: An open_clip ``CLIP`` with a plain ViT image tower and the standard text transformer.
        folder: The folder to write.
        tokenizer: The model's open_clip ``SimpleTokenizer`` (default: open_clip's, with the model's context length).
        overwrite: Replace an existing non-empty ``folder`` (only once the new one is complete).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: A tower or tokenizer with no exact transformers equivalent (the reason named), or a tokenizer
            whose end-of-text id is not the one the model pools (or whose context is longer than the model's).
        FileExistsError: ``folder`` is a file, or exists and is not empty without ``overwrite``.

    Example:
        >>> import tempfile, lightning_score.models as models
        >>> clip = models.build_clip("tiny-ViT-W64-L2")
        >>> folder = save_hf_copy(clip.model, tempfile.mkdtemp() + "/hf", tokenizer=clip.tokenizer)
        >>> sorted(p.name for p in folder.iterdir())[:4]
        ['config.json', 'merges.txt', 'model.safetensors', 'preprocessor_config.json']
    """
    from open_clip.tokenizer import SimpleTokenizer

    hf = hf_clip_from_open_clip(model)
    text = hf.config.text_config
    tokenizer = SimpleTokenizer(context_length=text.max_position_embeddings) if tokenizer is None else tokenizer
    found = (getattr(tokenizer, "eot_token_id", None), getattr(tokenizer, "context_length", None) or 0)
    if isinstance(tokenizer, SimpleTokenizer) and (
        found[0] != text.eos_token_id or found[1] > text.max_position_embeddings
    ):
        raise ValueError(
            f"The tokenizer's end-of-text id and context length {found} are not the model's ({text.eos_token_id}, "
            f"at most {text.max_position_embeddings}): give the model's own tokenizer."
        )
    processor = hf_image_processor_config(model.visual)

    def build(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))  # model.safetensors
        write_clip_tokenizer(tmp, tokenizer)
        record = {"image_processor_type": "CLIPImageProcessor", **processor}
        atomic_write_text(tmp / "preprocessor_config.json", json.dumps(record, indent=2) + "\n")

    publish_folder(Path(folder), build, overwrite=overwrite, what="The transformers copy's folder")
    return Path(folder)
