"""A PEFT-adapted module read as the weights it computes with: the base model's keys, LoRA updates applied.

A task vector must hold the update of each *weight* (what ``merge_and_unload()`` would write into the base
model), keyed by the base model's own names, never the adapter's parameters: ΔW = s·B·A is not linear in
(A, B), so merging the factors' deltas is not merging the updates. :func:`effective_state` reads a module that
holds PEFT layers exactly so:

* every state-dict key is renamed as the base model names it: the wrappers PEFT inserts (``base_model.model.``
  of a ``PeftModel``, ``base_layer.`` of a tuner layer, ``modules_to_save.<adapter>.`` of a saved module) are
  removed, and the copies nothing computes with (``original_module.`` of a saved module, other adapters' saved
  copies) are left out;
* a LoRA layer's weight is its base weight plus each active adapter's update, computed by PEFT's own
  ``get_delta_weight`` in the order ``merge()`` adds them, so the result is ``merge_and_unload()``'s weights;
* adapter parameters (``lora_A``, ``lora_B``, ...) are never entries.

Only adapters whose effect is such a weight update are read (:data:`SUPPORTED`); any other tuner layer, a
prompt-learning model, a LoRA variant (DoRA, ...), a quantized base layer or an adapter already merged into its
base weights is refused with one message naming it. PEFT is imported only when the module holds its layers (a
module with PEFT layers has imported PEFT already).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_score.utilities.low_rank import LowRankUpdate, add_updates

__all__ = [
    "SUPPORTED",
    "UnsupportedAdapterError",
    "adapted_keys",
    "adapter_provenance",
    "adapter_targets",
    "effective_state",
    "holds_adapters",
    "low_rank_updates",
]

SUPPORTED = (
    "LoRA (peft.LoraConfig, rsLoRA included) on Linear, Embedding, Conv1d/2d/3d and MultiheadAttention layers, "
    "fan_in_fan_out, lora_bias, several active adapters, and modules_to_save"
)
"""What :func:`effective_state` reads, in words (for messages and docs)."""

_LORA_CLASSES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")
# The layers whose merge() rounds each update to the base weight's dtype before adding it; the others add the update
# in its own dtype (float32 adapters on a bf16 base: the sum is rounded once). Followed so that the weights are
# merge_and_unload()'s bit for bit (tests/callback/test_adapters.py checks it per layer type, in bf16).
_CAST_FIRST = ("Embedding", "MultiheadAttention")


class UnsupportedAdapterError(ValueError):
    """A module holds an adapter whose effect lightning-score cannot write as a weight update."""


def holds_adapters(module: nn.Module) -> bool:
    """Whether ``module`` holds PEFT tuner layers, saved-module wrappers or is a PEFT model.

    Example:
        >>> from torch import nn
        >>> holds_adapters(nn.Linear(2, 2))
        False
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return any(isinstance(sub, BaseTunerLayer | AuxiliaryTrainingWrapper | peft.PeftModel) for sub in module.modules())


@dataclass(frozen=True)
class _Entry:
    """One state-dict entry of an adapted module: its base-model key, or None for what is not a weight."""

    raw: str
    key: str | None


def _rename(root: nn.Module, segments: list[str]) -> list[str] | None:
    """The base model's name of the submodule ``root.<segments>``; None inside an adapter or an unused copy."""
    import peft
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    node, kept, index = root, [], 0
    while index < len(segments):
        segment = segments[index]
        if isinstance(node, peft.PeftModel) and segment == "base_model":
            node = node.base_model
        elif isinstance(node, BaseTuner) and segment == "model":
            node = node.model
        elif isinstance(node, BaseTunerLayer) and segment == "base_layer":
            node = node.base_layer
        elif isinstance(node, BaseTunerLayer) and segment in (*node.adapter_layer_names, *node.other_param_names):
            return None
        elif isinstance(node, ModulesToSaveWrapper) and segment == "modules_to_save":
            adapter = segments[index + 1] if index + 1 < len(segments) else None
            if adapter not in node.active_adapters:
                return None  # another adapter's saved copy
            node, index = node.modules_to_save[adapter], index + 1
        elif isinstance(node, ModulesToSaveWrapper) and segment == "original_module":
            return None  # θ₀'s copy: the saved module's weights at the start hold the same values
        elif isinstance(node, AuxiliaryTrainingWrapper):
            raise UnsupportedAdapterError(
                f"'{'.'.join(kept) or type(root).__name__}' is a PEFT {type(node).__name__}, which lightning-score "
                f"does not read as a weight update. Supported: {SUPPORTED}."
            )
        else:
            node = node.get_submodule(segment)
            kept.append(segment)
        index += 1
    return kept


def _walk(module: nn.Module) -> Iterator[_Entry]:
    """Each floating-point state-dict entry of ``module`` with the key the base model gives it."""
    for raw, value in module.state_dict(keep_vars=True).items():
        if not value.is_floating_point():
            continue
        segments = raw.split(".")
        kept = _rename(module, segments[:-1])
        yield _Entry(raw, ".".join([*kept, segments[-1]]) if kept is not None else None)


def _check_layer(name: str, layer: nn.Module) -> None:
    """Refuse a tuner layer whose adapters are not plain LoRA updates of a plain base layer (``name``: base name)."""
    from peft.tuners.lora import LoraLayer

    kind = type(layer)
    if (
        not isinstance(layer, LoraLayer)
        or kind.__module__ != "peft.tuners.lora.layer"
        or kind.__name__ not in _LORA_CLASSES
    ):
        family = kind.__module__.split(".")[2].upper() if kind.__module__.startswith("peft.tuners.") else "tuner"
        raise UnsupportedAdapterError(
            f"'{name}' is a PEFT {family} layer ({kind.__module__}.{kind.__name__}), whose effect lightning-score "
            "cannot write as a weight update (its parameters must never be merged as if they were weights). "
            f"Supported: {SUPPORTED}."
        )
    variants = [adapter for adapter in layer.active_adapters if adapter in getattr(layer, "lora_variant", {})]
    if variants:
        raise UnsupportedAdapterError(
            f"'{name}' uses a LoRA variant for adapter(s) {variants} (DoRA, aLoRA, ...): its update is not s·B·A. "
            f"Supported: {SUPPORTED}."
        )
    if layer.merged:
        raise UnsupportedAdapterError(
            f"'{name}' has adapter(s) {layer.merged_adapters} merged into its base weights, so the base weights are "
            "no longer θ₀. Call unmerge_adapter() (or snapshot the model before merging)."
        )


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every tuner layer of ``module`` with its name, each checked by :func:`_check_layer`."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in module.named_modules():
        if isinstance(sub, peft.PeftModel) and sub.peft_config[sub.active_adapter].is_prompt_learning:
            kind = sub.peft_config[sub.active_adapter].peft_type
            raise UnsupportedAdapterError(
                f"'{name or type(sub).__name__}' is a prompt-learning PEFT model ({kind}): it learns inputs, not "
                f"weights, so it has no task vector. Supported: {SUPPORTED}."
            )
        if isinstance(sub, BaseTunerLayer):
            _check_layer(".".join(_rename(module, name.split(".")) or [name]), sub)
            yield name, sub


def adapted_keys(module: nn.Module) -> dict[str, str]:
    """The base-model key of each floating-point entry that is a weight: ``{key: raw state-dict key}``.

    Adapter parameters and copies nothing computes with are left out; see the module docstring.

    Raises:
        UnsupportedAdapterError: The module holds an adapter that is not read (see :data:`SUPPORTED`).
    """
    for _ in _lora_layers(module):
        pass
    return {entry.key: entry.raw for entry in _walk(module) if entry.key is not None}


def _weight_updates(layer: nn.Module) -> dict[str, Callable[[str], Tensor | None]]:
    """What a LoRA layer updates: each entry under its ``base_layer.``, with the update one adapter adds (or None).

    PEFT's ``MultiheadAttention.merge()`` (and so its forward and ``merge_and_unload``) adds ``out_proj``'s update
    once itself and once more through ``out_proj``'s own LoRA Linear, which is read as a layer of its own.
    """
    if type(layer).__name__ == "MultiheadAttention":
        return {
            "in_proj_weight": layer.get_delta_weight,
            "out_proj.base_layer.weight": layer.base_layer.out_proj.get_delta_weight,
        }
    updates: dict[str, Callable[[str], Tensor | None]] = {"weight": layer.get_delta_weight}
    if any(layer.lora_bias.get(adapter) for adapter in layer.active_adapters):
        updates["bias"] = lambda adapter: (
            layer.lora_B[adapter].bias * layer.scaling[adapter] if layer.lora_bias.get(adapter) else None
        )
    return updates


def _updated_entries(module: nn.Module) -> list[tuple[str, nn.Module, str, Callable[[str], Tensor | None], list[str]]]:
    """Every entry a LoRA layer updates, in the order ``merge()`` adds the updates (the layers checked first).

    Each as ``(raw key, layer, attribute, the update one adapter adds, the active adapters that have one)``.
    """
    entries = []
    for name, layer in list(_lora_layers(module)):
        prefix = f"{name}.base_layer." if name else "base_layer."
        adapters = [
            a for a in layer.active_adapters if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})
        ]
        for attribute, update_of in _weight_updates(layer).items():
            entries.append((prefix + attribute, layer, attribute, update_of, adapters))
    return entries


def effective_state(module: nn.Module) -> dict[str, Tensor]:
    """The weights ``module`` computes with, by base-model key: ``merge_and_unload()``'s, without changing it.

    Entries of LoRA layers are new tensors (base weight plus the active adapters' updates, detached); every other
    entry is the live tensor itself.

    Raises:
        UnsupportedAdapterError: The module holds an adapter that is not read (see :data:`SUPPORTED`).
    """
    updated = _updated_entries(module)
    keys = {entry.raw: entry.key for entry in _walk(module) if entry.key is not None}
    full = module.state_dict(keep_vars=True)
    state = {key: full[raw] for raw, key in keys.items()}
    for raw, layer, _, update_of, adapters in updated:
        cast_first = type(layer).__name__ in _CAST_FIRST
        merged = state[keys[raw]].detach().clone()
        for adapter in adapters:
            delta = update_of(adapter)
            if delta is not None:
                merged += delta.detach().to(merged.dtype) if cast_first else delta.detach()
        state[keys[raw]] = merged
    return state


def _factors(layer: nn.Module, attribute: str, adapter: str) -> tuple[Tensor, Tensor, float] | None:
    """``(B, A, s)`` with ``get_delta_weight`` = s·B·A for one adapter's update of ``attribute`` (None: not so)."""
    kind = type(layer).__name__
    if kind == "MultiheadAttention":
        if attribute == "in_proj_weight":
            return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, layer.scaling[adapter]
        return _factors(layer.base_layer.out_proj, "weight", adapter)  # out_proj's own LoRA Linear
    if kind == "Embedding" and attribute == "weight":  # PEFT: (B_e A_e)ᵀ·s = A_eᵀ B_eᵀ·s
        return layer.lora_embedding_A[adapter].mT, layer.lora_embedding_B[adapter].mT, layer.scaling[adapter]
    if kind == "Linear" and attribute == "weight":
        B, A = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        return (A.mT, B.mT, layer.scaling[adapter]) if layer.fan_in_fan_out else (B, A, layer.scaling[adapter])
    return None  # convolutions (kernels), lora_bias: dense updates


def low_rank_updates(module: nn.Module) -> dict[str, LowRankUpdate]:
    """The adapted weights' updates as factors, by base-model key: Δ = s·B·A summed over the active adapters.

    The same updates :func:`effective_state` adds (PEFT's ``get_delta_weight``, ``MultiheadAttention``'s ``out_proj``
    twice, as its merge adds it), written s·B·A exactly: Linear (``fan_in_fan_out`` transposed), Embedding and
    ``MultiheadAttention`` layers. A weight is left out (it stays a dense entry) when one of its updates is not of
    that form (a convolution's kernel), or when the base weight itself is trained. Several adapters, or one update
    added twice, give factors of the summed rank (an update added twice: its factors once, with twice the scale).
    Factors are the live parameters, detached; the dtype of the update is the base weight's.

    Raises:
        UnsupportedAdapterError: The module holds an adapter that is not read (see :data:`SUPPORTED`).
    """
    updated = _updated_entries(module)
    keys = {entry.raw: entry.key for entry in _walk(module) if entry.key is not None}
    full = module.state_dict(keep_vars=True)
    parts: dict[str, list[tuple[Tensor, Tensor, float] | None]] = {}
    bases: dict[str, Tensor] = {}  # each key's base weight
    for raw, layer, attribute, _, adapters in updated:
        bases[keys[raw]] = full[raw]
        parts.setdefault(keys[raw], []).extend(_factors(layer, attribute, adapter) for adapter in adapters)
    updates: dict[str, LowRankUpdate] = {}
    for key, factors in parts.items():
        base = bases[key]
        if not factors or any(part is None for part in factors) or base.requires_grad:
            continue
        merged: dict[tuple[Any, ...], LowRankUpdate] = {}  # one update added twice: its scale twice
        for B, A, scale in factors:  # type: ignore[misc]
            same_memory = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (B, A))
            same = merged.get(same_memory)
            merged[same_memory] = LowRankUpdate(
                B.detach(), A.detach(), scale + (same.scale if same else 0.0), base.dtype
            )
        total = list(merged.values())
        updates[key] = total[0]
        for update in total[1:]:
            updates[key] = add_updates(updates[key], update)
    return updates


def adapter_targets(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Which weights each adapter parameter updates: ``{raw adapter key: (base-model keys, ...)}``.

    A LoRA layer's ``lora_A``/``lora_B`` entries update its base weight (and its bias with ``lora_bias``); those of
    a ``MultiheadAttention`` layer update ``in_proj_weight`` and ``out_proj.weight``. So a selection of trainable
    parameters (the adapters) becomes a selection of the weights they change.

    Raises:
        UnsupportedAdapterError: The module holds an adapter that is not read (see :data:`SUPPORTED`).
    """
    layers = dict(_lora_layers(module))
    entries = list(_walk(module))
    keys = {entry.raw: entry.key for entry in entries if entry.key is not None}
    targets: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        if entry.key is not None:
            continue
        owners = [name for name in layers if entry.raw.startswith(f"{name}." if name else "")]
        if not owners:
            continue  # a saved module's original copy, another adapter's saved copy
        name = max(owners, key=len)  # the innermost layer (out_proj's own LoRA inside a MultiheadAttention)
        prefix = f"{name}.base_layer." if name else "base_layer."
        targets[entry.raw] = tuple(keys[prefix + attribute] for attribute in _weight_updates(layers[name]))
    return targets


def adapter_provenance(module: nn.Module) -> dict[str, Any]:
    """What a task vector records of the adapters it came from (PEFT's version; per adapter its LoRA settings).

    Per active adapter: its ranks, α and scales (rsLoRA's included) and the base-model names of the layers it adapts.

    Raises:
        UnsupportedAdapterError: The module holds an adapter that is not read (see :data:`SUPPORTED`).
    """
    import peft

    adapters: dict[str, dict[str, Any]] = {}
    for name, layer in _lora_layers(module):
        base_name = ".".join(_rename(module, name.split(".")) or [name]) if name else ""
        for adapter in layer.active_adapters:
            if adapter not in layer.r:
                continue
            record = adapters.setdefault(adapter, {"r": set(), "lora_alpha": set(), "scaling": set(), "targets": []})
            record["r"].add(int(layer.r[adapter]))
            record["lora_alpha"].add(float(layer.lora_alpha[adapter]))
            record["scaling"].add(float(layer.scaling[adapter]))
            record["targets"].append(base_name)
    summary = {
        adapter: {field: sorted(values) for field, values in record.items()} for adapter, record in adapters.items()
    }
    return {"peft_version": peft.__version__, "type": "LORA", "adapters": summary}
