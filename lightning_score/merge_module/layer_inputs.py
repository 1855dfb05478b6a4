"""The inputs of a model's linear layers, recorded during forward passes (for ESM's and RegMean's statistics).

A weight key names the layer it belongs to: ``...mlp.c_fc.weight`` is the ``nn.Linear`` at ``...mlp.c_fc``,
whose input a forward pre-hook sees; ``...attn.in_proj_weight`` is the ``nn.MultiheadAttention`` at
``...attn``, whose ``query`` is the input of its q, k and v projections (self-attention: one input).

``...attn.out_proj.weight`` needs more: ``nn.MultiheadAttention`` applies ``out_proj``'s weight inside
``F.multi_head_attention_forward`` without calling the module, so no hook on ``out_proj`` ever fires. Its
input (the heads' attention outputs, concatenated) is recomputed from the attention's own inputs by the same
function with an identity output projection, so ``out_proj``'s input X satisfies ``X Wᵀ + b`` = the
attention's output (a test checks this).

Rows are images × tokens; every recorded input is reshaped to ``[rows, width]``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention_values", "layer_owner", "record_layer_inputs"]

Sink = Callable[[str, Tensor], None]


def layer_owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module a weight key belongs to, and how its input is found: ``"input"`` or ``"attention_values"``.

    Raises:
        ValueError: The key names no module of ``model``.
    """
    path = key.removesuffix(".in_proj_weight").removesuffix(".weight")
    try:
        module = operator.attrgetter(path)(model)
    except AttributeError:
        raise ValueError(f"Weight key '{key}' names no layer of {type(model).__name__} ('{path}').") from None
    parent_path, _, leaf = path.rpartition(".")
    parent = operator.attrgetter(parent_path)(model) if parent_path else model
    if leaf == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        return parent, "attention_values"
    return module, "input"


def _attention_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    names = ("query", "key", "value")
    values = [args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names)]
    return values[0], values[1], values[2]


def attention_values(attention: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The input of ``attention.out_proj`` for one call ``attention(*args, **kwargs)``: ``[..., embed_dim]``.

    The attention is evaluated again by ``F.multi_head_attention_forward`` with the identity as the output
    projection (no dropout), in the caller's dtype and autocast state.
    """
    query, key, value = _attention_arguments(args, kwargs)
    if attention.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    weight = attention.out_proj.weight
    identity = torch.eye(attention.embed_dim, dtype=weight.dtype, device=weight.device)
    separate = not attention._qkv_same_embed_dim
    values, _ = F.multi_head_attention_forward(
        query, key, value, attention.embed_dim, attention.num_heads,
        attention.in_proj_weight, attention.in_proj_bias, attention.bias_k, attention.bias_v,
        attention.add_zero_attn, 0.0, identity, torch.zeros_like(attention.out_proj.bias) if
        attention.out_proj.bias is not None else None,
        training=False, key_padding_mask=kwargs.get("key_padding_mask"), need_weights=False,
        attn_mask=kwargs.get("attn_mask"), use_separate_proj_weight=separate,
        q_proj_weight=attention.q_proj_weight, k_proj_weight=attention.k_proj_weight,
        v_proj_weight=attention.v_proj_weight, is_causal=bool(kwargs.get("is_causal", False)),
    )  # fmt: skip
    return values.transpose(0, 1) if attention.batch_first else values


def _rows(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1])


@contextlib.contextmanager
def record_layer_inputs(model: nn.Module, keys: Sequence[str], sink: Sink) -> Iterator[None]:
    """While open, every forward of ``model`` calls ``sink(key, inputs [rows, width])`` for each key's layer.

    Args:
        model: The model whose layers are watched.
        keys: Weight keys of 2-D linear weights (``...weight`` of an ``nn.Linear``, ``...attn.in_proj_weight``,
            ``...attn.out_proj.weight``).
        sink: Receives each layer's inputs of each forward, detached, in the forward's dtype and device.

    Raises:
        ValueError: A key names no layer, or an attention's query, key and value differ (cross-attention:
            its in_proj has three inputs, not one).
    """
    handles = []
    for key in keys:
        module, kind = layer_owner(model, key)
        if kind == "attention_values":

            def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any, key: str = key) -> None:
                sink(key, _rows(attention_values(mod, args, kwargs)))

            handles.append(module.register_forward_hook(after, with_kwargs=True))
            continue

        def before(mod: nn.Module, args: tuple, kwargs: dict, key: str = key) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                query, key_input, value = _attention_arguments(args, kwargs)
                if key_input is not query or value is not query:
                    raise ValueError(f"'{key}' belongs to a cross-attention (query, key and value differ): its "
                                     "in_proj has three inputs, and only self-attention is supported.")  # fmt: skip
                sink(key, _rows(query))
            else:
                sink(key, _rows(args[0] if args else next(iter(kwargs.values()))))

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
