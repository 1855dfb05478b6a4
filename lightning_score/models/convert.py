"""The CLIP image tower's state dict in open_clip's, Hugging Face transformers' and timm's key conventions.

The same ViT is held under three sets of names and shapes. open_clip's (``model.visual.state_dict()``, the keys
of lightning-score's task vectors) is the hub every conversion goes through:

================================  ==============================================  ===========================
open_clip ``visual.*``            transformers (``CLIPVisionModelWithProjection``)  timm ``VisionTransformer``
================================  ==============================================  ===========================
``class_embedding`` [d]           ``vision_model.embeddings.class_embedding``     ``cls_token`` [1, 1, d]
``positional_embedding`` [T, d]   ``….embeddings.position_embedding.weight``      ``pos_embed`` [1, T, d]
``conv1.weight``                  ``….embeddings.patch_embedding.weight``         ``patch_embed.proj.weight``
``ln_pre.*``                      ``vision_model.pre_layrnorm.*`` (sic)           ``norm_pre.*``
``B.ln_1.*``                      ``L.layer_norm1.*``                             ``blocks.{i}.norm1.*``
``B.attn.in_proj_weight`` [3d,d]  ``L.self_attn.{q,k,v}_proj.weight`` 3×[d, d]    ``blocks.{i}.attn.qkv.weight``
``B.attn.in_proj_bias`` [3d]      ``L.self_attn.{q,k,v}_proj.bias`` 3×[d]         ``blocks.{i}.attn.qkv.bias``
``B.attn.out_proj.*``             ``L.self_attn.out_proj.*``                      ``blocks.{i}.attn.proj.*``
``B.ln_2.*``                      ``L.layer_norm2.*``                             ``blocks.{i}.norm2.*``
``B.mlp.c_fc.*``, ``c_proj``      ``L.mlp.fc1.*``, ``fc2``                        ``blocks.{i}.mlp.fc1.*``, ``fc2``
``ln_post.*``                     ``vision_model.post_layernorm.*``               ``norm.*``
``proj`` [d, e]                   ``visual_projection.weight`` [e, d] (ᵀ)         ``head.weight`` (ᵀ), ``head.bias`` 0
================================  ==============================================  ===========================

(``B`` is ``transformer.resblocks.{i}``, ``L`` is ``vision_model.encoder.layers.{i}``, ``….`` is ``vision_model``.)
The hf keys are those of ``CLIPVisionModelWithProjection`` and of the image half of ``CLIPModel``'s state dict;
its ``position_ids`` buffer is no weight and is dropped. The conversions are exact (renames, transposes,
reshapes, q/k/v split at d and 2d) and work key by key, so a task vector of a few keys converts too; a key no
rule knows (layer scale, attention pooling, another architecture) is refused by name.
:mod:`lightning_score.models.tower_configs` gives the other libraries' model of an open_clip tower's network.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BACKBONES",
    "KeyConvention",
    "KeyRule",
    "affine_rules",
    "convert_state_dict",
    "get_convention",
    "key_pattern",
    "qkv_split_rule",
    "transposed_rule",
]

Split = Callable[[Tensor], tuple[Tensor, ...]]
Join = Callable[[tuple[Tensor, ...]], Tensor]
Reshape = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class KeyRule:
    """One open_clip key (``{i}`` for a block index) and the backbone key(s) holding the same tensor.

    Attributes:
        open_clip: The open_clip key, e.g. ``"transformer.resblocks.{i}.attn.in_proj_weight"``.
        keys: The backbone's key or keys, e.g. ``("blocks.{i}.attn.qkv.weight",)``.
        to_backbone: open_clip's tensor to the backbone's tensors, one per key (default: itself).
        to_open_clip: The backbone's tensors back to open_clip's (default: the one tensor).
    """

    open_clip: str
    keys: tuple[str, ...]
    to_backbone: Split = lambda t: (t,)
    to_open_clip: Join = lambda ts: ts[0]


@dataclass(frozen=True)
class KeyConvention:
    """How one library names and shapes the image tower's tensors, relative to open_clip.

    Attributes:
        name: The backbone's name (``"open_clip"``, ``"hf"``, ``"timm"``).
        rules: One :class:`KeyRule` per open_clip key.
        ignored: Patterns of the backbone's keys that hold no weight and are dropped (``position_ids``).
        qkv: Per block, the attention's input projection weight and bias as ``(fused key, split key)`` pairs in
            the paper's matrix convention (:mod:`~lightning_score.models.conventions`); the split key has a
            ``{p}`` for ``q``, ``k``, ``v``.
        qkv_native: Which of the two the library itself holds (``"fused"`` or ``"split"``).
        as_matrix: ``(key, to open_clip's shape, back)`` for the keys whose tensor the library shapes otherwise
            than open_clip does (timm's 3-D ``pos_embed``, a projection stored transposed).
    """

    name: str
    rules: tuple[KeyRule, ...]
    ignored: tuple[str, ...] = ()
    qkv: tuple[tuple[str, str], ...] = ()
    qkv_native: str = "fused"
    as_matrix: tuple[tuple[str, Reshape, Reshape], ...] = ()


def affine_rules(open_clip: str, backbone: str) -> tuple[KeyRule, ...]:
    """A layer's ``weight`` and ``bias`` under another name."""
    return tuple(KeyRule(f"{open_clip}.{p}", (f"{backbone}.{p}",)) for p in ("weight", "bias"))


def _transpose(tensor: Tensor) -> Tensor:
    return tensor.mT.contiguous()


def transposed_rule(open_clip: str, backbone: str) -> KeyRule:
    """A matrix the backbone stores transposed (transformers' projection is open_clip's ``proj``ᵀ)."""
    return KeyRule(open_clip, (backbone,), lambda t: (_transpose(t),), lambda ts: _transpose(ts[0]))


def _qkv(fused: str, split: str) -> tuple[tuple[str, str], ...]:
    """The (fused, split) key pairs of a block's q/k/v weight and bias (``{w}`` is ``weight`` or ``bias``)."""
    return tuple((fused.format(i="{i}", p="{p}", w=w), split.format(i="{i}", p="{p}", w=w)) for w in ("weight", "bias"))


def qkv_split_rule(open_clip: str, backbone: str) -> KeyRule:
    """A fused [3d, ...] q/k/v tensor as three keys (``backbone`` has a ``{p}`` for ``q``, ``k``, ``v``)."""
    return KeyRule(
        open_clip,
        tuple(backbone.format(i="{i}", p=p) for p in "qkv"),
        lambda t: tuple(part.contiguous() for part in t.chunk(3, dim=0)),
        lambda ts: torch.cat(ts, dim=0),
    )


def _zero_bias(ts: tuple[Tensor, ...]) -> Tensor:
    weight, bias = ts
    if torch.count_nonzero(bias):
        raise ValueError(
            "timm's 'head.bias' is not zero, and open_clip's projection 'proj' has no bias: this timm model does "
            "not compute an open_clip tower. Zero it (or freeze it at zero when fine-tuning) before converting."
        )
    return _transpose(weight)


_OC = "transformer.resblocks.{i}"
_HF = "vision_model.encoder.layers.{i}"
_TIMM = "blocks.{i}"

HF = KeyConvention(
    "hf",
    (
        KeyRule("class_embedding", ("vision_model.embeddings.class_embedding",)),
        KeyRule("positional_embedding", ("vision_model.embeddings.position_embedding.weight",)),
        KeyRule("conv1.weight", ("vision_model.embeddings.patch_embedding.weight",)),
        *affine_rules("ln_pre", "vision_model.pre_layrnorm"),
        *affine_rules(f"{_OC}.ln_1", f"{_HF}.layer_norm1"),
        qkv_split_rule(f"{_OC}.attn.in_proj_weight", f"{_HF}.self_attn.{{p}}_proj.weight"),
        qkv_split_rule(f"{_OC}.attn.in_proj_bias", f"{_HF}.self_attn.{{p}}_proj.bias"),
        *affine_rules(f"{_OC}.attn.out_proj", f"{_HF}.self_attn.out_proj"),
        *affine_rules(f"{_OC}.ln_2", f"{_HF}.layer_norm2"),
        *affine_rules(f"{_OC}.mlp.c_fc", f"{_HF}.mlp.fc1"),
        *affine_rules(f"{_OC}.mlp.c_proj", f"{_HF}.mlp.fc2"),
        *affine_rules("ln_post", "vision_model.post_layernorm"),
        transposed_rule("proj", "visual_projection.weight"),
    ),
    ignored=("vision_model.embeddings.position_ids",),
    qkv=_qkv(f"{_HF}.self_attn.qkv_proj.{{w}}", f"{_HF}.self_attn.{{p}}_proj.{{w}}"),
    qkv_native="split",
    as_matrix=(("visual_projection.weight", _transpose, _transpose),),
)

TIMM = KeyConvention(
    "timm",
    (
        KeyRule("class_embedding", ("cls_token",), lambda t: (t.reshape(1, 1, -1),), lambda ts: ts[0].reshape(-1)),
        KeyRule("positional_embedding", ("pos_embed",), lambda t: (t.unsqueeze(0),), lambda ts: ts[0].squeeze(0)),
        KeyRule("conv1.weight", ("patch_embed.proj.weight",)),
        *affine_rules("ln_pre", "norm_pre"),
        *affine_rules(f"{_OC}.ln_1", f"{_TIMM}.norm1"),
        KeyRule(f"{_OC}.attn.in_proj_weight", (f"{_TIMM}.attn.qkv.weight",)),
        KeyRule(f"{_OC}.attn.in_proj_bias", (f"{_TIMM}.attn.qkv.bias",)),
        *affine_rules(f"{_OC}.attn.out_proj", f"{_TIMM}.attn.proj"),
        *affine_rules(f"{_OC}.ln_2", f"{_TIMM}.norm2"),
        *affine_rules(f"{_OC}.mlp.c_fc", f"{_TIMM}.mlp.fc1"),
        *affine_rules(f"{_OC}.mlp.c_proj", f"{_TIMM}.mlp.fc2"),
        *affine_rules("ln_post", "norm"),
        KeyRule(
            "proj",
            ("head.weight", "head.bias"),
            lambda t: (_transpose(t), t.new_zeros(t.shape[-1])),
            _zero_bias,
        ),
    ),
    qkv=_qkv(f"{_TIMM}.attn.qkv.{{w}}", f"{_TIMM}.attn.{{p}}.{{w}}"),
    as_matrix=(
        ("pos_embed", lambda t: t.squeeze(0), lambda t: t.unsqueeze(0)),
        ("head.weight", _transpose, _transpose),
    ),
)

OPEN_CLIP = KeyConvention(
    "open_clip",
    tuple(KeyRule(r.open_clip, (r.open_clip,)) for r in HF.rules),
    qkv=(
        (f"{_OC}.attn.in_proj_weight", f"{_OC}.attn.{{p}}_proj_weight"),
        (f"{_OC}.attn.in_proj_bias", f"{_OC}.attn.{{p}}_proj_bias"),
    ),
)

BACKBONES: dict[str, KeyConvention] = {c.name: c for c in (OPEN_CLIP, HF, TIMM)}
"""The key conventions by backbone name; a fourth backbone registers one :class:`KeyConvention` here."""


def get_convention(backbone: str) -> KeyConvention:
    """The key convention of ``backbone`` (``"open_clip"``, ``"hf"`` or ``"timm"``)."""
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise ValueError(f"Unknown backbone {backbone!r}: use one of {sorted(BACKBONES)}.") from None


@functools.cache
def key_pattern(template: str) -> re.Pattern[str]:
    """A key template's regular expression: ``{i}`` matches a block index, ``{p}`` one of ``q``, ``k``, ``v``."""
    escaped = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(escaped.replace(re.escape("{p}"), "(?P<p>[qkv])"))


def _to_open_clip(state: Mapping[str, Tensor], convention: KeyConvention) -> dict[str, Tensor]:
    """Every key of ``state`` (the backbone's) under open_clip's name, in open_clip's shape."""
    owner: dict[str, tuple[KeyRule, str | None]] = {}  # backbone key -> its rule and block index
    for key in state:
        if any(key_pattern(p).fullmatch(key) for p in convention.ignored):
            continue
        for rule in convention.rules:
            found = next((m for m in (key_pattern(t).fullmatch(key) for t in rule.keys) if m), None)
            if found is not None:
                owner[key] = (rule, found.groupdict().get("i"))
                break
        else:
            raise ValueError(
                f"Key {key!r} is no key of a CLIP ViT image tower in {convention.name}'s convention (such as "
                f"{[t for r in convention.rules for t in r.keys][:4]}): lightning-score converts the plain CLIP ViT "
                "(class token, pre-norm, no layer scale, no attention pooling)."
            )
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, (rule, index) in owner.items():
        if key in done:
            continue
        names = [t.replace("{i}", index or "") for t in rule.keys]
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(
                f"Key {key!r} of {convention.name} converts to open_clip's "
                f"{rule.open_clip.replace('{i}', index or '')!r} together with {missing}, which the state dict "
                "lacks: convert the whole tower, or at least all of these keys."
            )
        done.update(names)
        out[rule.open_clip.replace("{i}", index or "")] = rule.to_open_clip(tuple(state[n] for n in names))
    return out


def _from_open_clip(state: Mapping[str, Tensor], convention: KeyConvention) -> dict[str, Tensor]:
    """Every key of ``state`` (open_clip's) under the backbone's name(s), in the backbone's shape."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        for rule in convention.rules:
            found = key_pattern(rule.open_clip).fullmatch(key)
            if found is not None:
                index = found.groupdict().get("i") or ""
                out.update(zip([t.replace("{i}", index) for t in rule.keys], rule.to_backbone(tensor), strict=True))
                break
        else:
            raise ValueError(
                f"Key {key!r} is no key of open_clip's plain CLIP ViT image tower (model.visual): lightning-score "
                "converts the tower with a class token, pre-norm, no layer scale and no attention pooling."
            )
    return out


def convert_state_dict(state: Mapping[str, Tensor], source: str, target: str) -> dict[str, Tensor]:
    """The image tower's state dict (or task vector) of ``source``'s convention in ``target``'s.

    Exact: only renames, transposes, reshapes and the q/k/v split or concatenation; dtypes are kept, and tensors
    that need no change are the input's own (not copies). Keys convert one by one (q/k/v together), so any subset
    of the tower's keys converts.

    Args:
        state: Keys to tensors in ``source``'s convention: open_clip's ``model.visual.state_dict()``,
            transformers' ``CLIPVisionModelWithProjection`` (or ``CLIPModel``'s image keys), timm's
            ``VisionTransformer``.
        source: ``"open_clip"``, ``"hf"`` or ``"timm"``.
        target: Same choices.

    Returns:
        A new dict in ``target``'s convention.

    Raises:
        ValueError: An unknown backbone; a key of no plain CLIP ViT (named); one of q/k/v, or timm's
            ``head.weight``/``head.bias``, without the others; a non-zero timm ``head.bias`` (open_clip's
            projection has none).

    Example:
        >>> import torch
        >>> hf = convert_state_dict({"transformer.resblocks.0.attn.in_proj_bias": torch.arange(6.0)}, "open_clip", "hf")
        >>> {k.split(".", 5)[-1]: v.tolist() for k, v in hf.items()}
        {'q_proj.bias': [0.0, 1.0], 'k_proj.bias': [2.0, 3.0], 'v_proj.bias': [4.0, 5.0]}
    """
    source_convention, target_convention = get_convention(source), get_convention(target)
    return _from_open_clip(_to_open_clip(state, source_convention), target_convention)
