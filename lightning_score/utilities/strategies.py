"""Which Lightning strategies and precision plugins the train-then-merge layer supports, checked at ``setup``.

A task vector is θ_fine-tuned − θ_pre-trained over the FULL weights of the fine-tuned module, and a merged
model is loaded into the full module. Under DDP (whichever launcher: ``ddp``, ``ddp_spawn``, ``ddp_fork``,
``ddp_notebook``) and on a single device every process holds the full module. Under FSDP (``FSDPStrategy``)
and FSDP2 (``ModelParallelStrategy``) the weights are sharded: they are gathered to rank zero and loaded back
shard by shard through ``torch.distributed.checkpoint`` (below). DeepSpeed
(ZeRO-3 partitions the parameters) and XLA devices are refused when fitting or testing starts, with one message
saying what is supported; nothing empty or placeholder is ever written.

Precision plugins that replace layers (bitsandbytes, Transformer Engine) change the state-dict keys and
values of the module; they are refused the same way. ``32-true``, ``64-true``, ``16-mixed``, ``bf16-mixed``,
``16-true`` and ``bf16-true`` are supported (under FSDP through its own ``FSDPPrecision``): the pre-trained
snapshot is taken in the weights' own precision before the strategy converts the module (see
:class:`~lightning_score.ScoreMergeCallback`).

See ``docs/strategies.md`` for the table and the tests behind each row.

The full weights in and out of a module sharded by FSDP (``FSDPStrategy``) or FSDP2 (``ModelParallelStrategy``):
no process holds the whole module once the strategy has wrapped it (FSDP1 keeps flat shards inside
``FullyShardedDataParallel`` units, FSDP2 and a tensor-parallel plan of ``ModelParallelStrategy`` keep each
parameter as a ``DTensor``, sharded by row or by column, or replicated, over the device mesh). The
train-then-merge layer needs the full weights twice (θ₀ when fitting starts, θ_T when it ends) and loads full
weights back (the merge, for testing):

* :func:`gather_full_state`: ``torch.distributed.checkpoint``'s ``get_model_state_dict(full_state_dict=True,
  cpu_offload=True)``, a collective that every rank of the Trainer must enter; rank zero receives the full
  tensors on CPU (one gathered copy), every other rank an empty dict, so no other rank holds more than its shard.
* :func:`load_full_state`: every rank passes the full tensors of the keys to load and keeps its own shard.

Keys are the unwrapped module's (:func:`unwrapped_key`: no ``_fsdp_wrapped_module.``, no
``_checkpoint_wrapped_module.``). Before the strategy wraps the module (in ``setup``) every process holds it
whole and :func:`sharding_root` is None: the callers read and write the live tensors as under DDP.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lightning.pytorch.plugins.precision import (
    BitsandbytesPrecision,
    DeepSpeedPrecision,
    DoublePrecision,
    FSDPPrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
    TransformerEnginePrecision,
    XLAPrecision,
)
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from torch import Tensor, nn

__all__ = [
    "SHARDED_STRATEGIES",
    "SUPPORTED_PRECISIONS",
    "SUPPORTED_STRATEGIES",
    "check_strategy",
    "gather_full_state",
    "is_sharded",
    "load_full_state",
    "load_submodule_state",
    "sharding_root",
    "unwrapped_key",
]

SUPPORTED_STRATEGIES = (
    "a single device, 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', 'fsdp' (FSDPStrategy) or ModelParallelStrategy "
    "(FSDP2)"
)
SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, ModelParallelStrategy)
"""The strategies that shard the module: FSDP1 and FSDP2 (with or without a tensor-parallel plan)."""
SUPPORTED_PRECISIONS = "'32-true', '64-true', '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'"

# Checked before the supported kinds: DeepSpeed and XLA strategies are DDPStrategy subclasses.
_REFUSED_STRATEGIES: tuple[tuple[type[Strategy], str], ...] = (
    (
        DeepSpeedStrategy,
        "ZeRO-3 partitions the parameters, leaving size-0 placeholders on every rank, and gathering them "
        "(deepspeed.zero.GatheredParameters, or ZeRO's checkpoint converter) is not implemented nor verified here; "
        "shard the model with 'fsdp' (FSDPStrategy) or ModelParallelStrategy (FSDP2) instead",
    ),
    (XLAStrategy, "XLA keeps the weights on TPU devices, which this release has not been verified on"),
    (SingleDeviceXLAStrategy, "XLA keeps the weights on a TPU device, which this release has not been verified on"),
)
_REFUSED_PRECISIONS: tuple[tuple[type[Precision], str], ...] = (
    (BitsandbytesPrecision, "bitsandbytes replaces the linear layers with quantised ones"),
    (TransformerEnginePrecision, "Transformer Engine replaces the linear layers with its own"),
    (DeepSpeedPrecision, "it belongs to the DeepSpeed strategy"),
    (XLAPrecision, "it belongs to the XLA strategy"),
)
_SUPPORTED_PRECISION_TYPES = (MixedPrecision, HalfPrecision, DoublePrecision)


def check_strategy(strategy: Strategy, who: str) -> None:
    """Refuse a strategy or precision plugin that the train-then-merge layer does not support.

    Args:
        strategy: The Trainer's strategy (its precision plugin is checked too).
        who: The component asking, for the message (``"ScoreMergeCallback"``, ``"MergeModule"``).

    Raises:
        ValueError: One message naming the strategy, why it is refused and what is supported.
    """
    kind_name = type(strategy).__name__
    name = getattr(strategy, "strategy_name", None)
    label = f"the '{name}' strategy ({kind_name})" if name else f"the {kind_name} strategy"
    fix = (
        f"{who} supports {SUPPORTED_STRATEGIES}, in precision "
        f"{SUPPORTED_PRECISIONS}: fine-tune and merge with one of them (see docs/strategies.md)."
    )
    for kind, reason in _REFUSED_STRATEGIES:
        if isinstance(strategy, kind):
            raise ValueError(f"{who} does not support {label}: {reason}. {fix}")
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, *SHARDED_STRATEGIES)):
        raise ValueError(f"{who} does not support {label}. {fix}")
    precision = strategy.precision_plugin
    for kind, reason in _REFUSED_PRECISIONS:
        if isinstance(precision, kind):
            raise ValueError(
                f"{who} does not support the precision plugin {type(precision).__name__}: {reason}, so the state "
                f"dict is no longer the pre-trained model's. {fix}"
            )
    if type(precision) is not Precision and not isinstance(precision, (*_SUPPORTED_PRECISION_TYPES, FSDPPrecision)):
        raise ValueError(f"{who} does not support the precision plugin {type(precision).__name__}. {fix}")


# --- the sharded strategies: full weights out of and into a sharded module -----------------------------

_WRAPPERS = re.compile(r"(^|\.)(?:(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.)+")


def unwrapped_key(key: str) -> str:
    """A state-dict key (or module name + ``.``) without the names wrappers insert.

    ``torch.compile``'s ``_orig_mod.``, FSDP1's ``_fsdp_wrapped_module.``, activation checkpointing's
    ``_checkpoint_wrapped_module.``.

    Example:
        >>> unwrapped_key("_fsdp_wrapped_module.head.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight")
        'head.0.weight'
    """
    return _WRAPPERS.sub(r"\1", key)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) is sharded now: an FSDP1 unit, an FSDP2 module or a DTensor."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(part, FullyShardedDataParallel | FSDPModule) for part in module.modules()):
        return True
    return any(isinstance(param, DTensor) for param in module.parameters())


def sharding_root(strategy: Strategy | None, module: nn.Module) -> nn.Module | None:
    """The module to gather from and load into when ``module`` is sharded by ``strategy``, else None.

    It is the strategy's wrapped model (FSDP1's root ``FullyShardedDataParallel``; under FSDP2 the LightningModule
    itself), whose state-dict keys are the LightningModule's.
    """
    if not isinstance(strategy, SHARDED_STRATEGIES):
        return None
    root = strategy.model
    if root is None or not is_sharded(module):
        return None
    return root


def gather_full_state(root: nn.Module) -> dict[str, Tensor]:
    """The full weights of a sharded module, on rank zero (CPU tensors); ``{}`` on every other rank.

    A collective: every rank of the process group that shards ``root`` must call it, in the same order.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(root, options=options)


def load_full_state(root: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load full tensors into a sharded module: every rank passes the same ``state`` and keeps its shard of it.

    FSDP2 (``DTensor`` parameters): each rank cuts its own shard from the full tensor (no communication), and an
    unsharded entry (one ``fully_shard`` was told to ignore) is copied as it is. FSDP1: ``set_model_state_dict``
    with ``full_state_dict=True``.

    Args:
        root: The sharded module (:func:`sharding_root`).
        state: Full tensors by the root's state-dict keys; the keys left out keep their values.

    Raises:
        KeyError: A key of ``state`` is not one of the module's.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    live = root.state_dict(keep_vars=True)
    unexpected = [key for key in state if key not in live]
    if unexpected:
        raise KeyError(f"The sharded module has no entries {unexpected[:3]} to load the full weights into.")
    if not any(isinstance(value, DTensor) for value in live.values()):
        set_model_state_dict(root, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for key, full in state.items():
            target = live[key]
            value = full.to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):
                shard = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(value)


def load_submodule_state(
    strategy: Strategy | None, module: nn.Module, submodule: nn.Module, state: Mapping[str, Tensor]
) -> None:
    """``submodule.load_state_dict(state, strict=True)``, also once the strategy has sharded it.

    Args:
        strategy: The Trainer's strategy (None: no Trainer).
        module: The LightningModule that holds ``submodule`` (its prefix there is found by identity).
        submodule: Where ``state`` goes, e.g. the image encoder.
        state: Full tensors by ``submodule``'s own keys, every one of them (the same on every rank when sharded).

    Raises:
        KeyError: ``state`` does not have exactly the submodule's keys.
    """
    root = sharding_root(strategy, submodule)
    if root is None:
        submodule.load_state_dict(dict(state), strict=True)
        return
    names = {part: unwrapped_key(f"{name}.") if name else "" for name, part in module.named_modules()}
    prefix = names[submodule]
    own = {unwrapped_key(key) for key in submodule.state_dict()}
    if own != set(state):
        raise KeyError(f"The weights to load do not have the module's keys (e.g. {sorted(own ^ set(state))[:3]}).")
    load_full_state(root, {prefix + key: value for key, value in state.items()})
