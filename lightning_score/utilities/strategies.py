"""Which Lightning strategies and precision plugins the train-then-merge layer supports, checked at ``setup``.

A task vector is θ_fine-tuned − θ_pre-trained over the FULL weights of the fine-tuned module, and a merged
model is loaded into the full module. Under DDP (whichever launcher: ``ddp``, ``ddp_spawn``, ``ddp_fork``,
``ddp_notebook``) and on a single device every process holds the full module. Under FSDP (``FSDPStrategy``)
and FSDP2 (``ModelParallelStrategy``) the weights are sharded: they are gathered to rank zero and loaded back
shard by shard through ``torch.distributed.checkpoint`` (:mod:`lightning_score.utilities.sharded`). DeepSpeed
(ZeRO-3 partitions the parameters) and XLA devices are refused when fitting or testing starts, with one message
saying what is supported; nothing empty or placeholder is ever written.

Precision plugins that replace layers (bitsandbytes, Transformer Engine) change the state-dict keys and
values of the module; they are refused the same way. ``32-true``, ``64-true``, ``16-mixed``, ``bf16-mixed``,
``16-true`` and ``bf16-true`` are supported (under FSDP through its own ``FSDPPrecision``): the pre-trained
snapshot is taken in the weights' own precision before the strategy converts the module (see
:class:`~lightning_score.ScoreMergeCallback`).

See ``docs/strategies.md`` for the table and the tests behind each row.
"""

from __future__ import annotations

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
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy

from lightning_score.utilities.sharded import SHARDED_STRATEGIES

__all__ = ["SUPPORTED_PRECISIONS", "SUPPORTED_STRATEGIES", "check_strategy"]

SUPPORTED_STRATEGIES = (
    "a single device, 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', 'fsdp' (FSDPStrategy) or ModelParallelStrategy "
    "(FSDP2)"
)
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
