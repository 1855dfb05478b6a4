"""Which Lightning strategies and precision plugins the train-then-merge layer supports, checked at ``setup``.

A task vector is θ_fine-tuned − θ_pre-trained over the FULL weights of the fine-tuned module, and a merged
model is loaded into the full module. Under the supported strategies every process holds the full module
(single device; DDP, whichever launcher: ``ddp``, ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``). Strategies
that shard the weights across processes (FSDP, DeepSpeed, ModelParallel) or keep them on an XLA device would
need their own gather; this release does not do it, and never writes an empty or placeholder task vector:
it refuses them when fitting or testing starts, with one message saying what is supported.

Precision plugins that replace layers (bitsandbytes, Transformer Engine) change the state-dict keys and
values of the module; they are refused the same way. ``32-true``, ``64-true``, ``16-mixed``, ``bf16-mixed``,
``16-true`` and ``bf16-true`` are supported: the pre-trained snapshot is taken in the weights' own precision
before the strategy converts the module (see :class:`~lightning_score.ScoreMergeCallback`).

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
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy

__all__ = ["SUPPORTED_PRECISIONS", "SUPPORTED_STRATEGIES", "check_strategy"]

SUPPORTED_STRATEGIES = "a single device, 'ddp', 'ddp_spawn', 'ddp_fork' or 'ddp_notebook'"
SUPPORTED_PRECISIONS = "'32-true', '64-true', '16-mixed', 'bf16-mixed', '16-true' or 'bf16-true'"

# Checked in this order: DeepSpeed and XLA strategies are DDPStrategy subclasses, so they come first.
_REFUSED_STRATEGIES: tuple[tuple[type[Strategy], str], ...] = (
    (FSDPStrategy, "FSDP shards the weights across processes (rank zero alone gathers the full state dict)"),
    (DeepSpeedStrategy, "DeepSpeed partitions the weights (ZeRO-3 leaves placeholder parameters on each rank)"),
    (ModelParallelStrategy, "ModelParallel shards the weights as DTensors across the device mesh"),
    (XLAStrategy, "XLA keeps the weights on TPU devices, which this release has not been verified on"),
    (SingleDeviceXLAStrategy, "XLA keeps the weights on a TPU device, which this release has not been verified on"),
)
_REFUSED_PRECISIONS: tuple[tuple[type[Precision], str], ...] = (
    (BitsandbytesPrecision, "bitsandbytes replaces the linear layers with quantised ones"),
    (TransformerEnginePrecision, "Transformer Engine replaces the linear layers with its own"),
    (DeepSpeedPrecision, "it belongs to the DeepSpeed strategy"),
    (FSDPPrecision, "it belongs to the FSDP strategy"),
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
        f"{who} supports {SUPPORTED_STRATEGIES} (every process holds the full weights), in precision "
        f"{SUPPORTED_PRECISIONS}: fine-tune and merge with one of them (see docs/strategies.md)."
    )
    for kind, reason in _REFUSED_STRATEGIES:
        if isinstance(strategy, kind):
            raise ValueError(f"{who} does not support {label}: {reason}. {fix}")
    if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
        raise ValueError(f"{who} does not support {label}. {fix}")
    precision = strategy.precision_plugin
    for kind, reason in _REFUSED_PRECISIONS:
        if isinstance(precision, kind):
            raise ValueError(
                f"{who} does not support the precision plugin {type(precision).__name__}: {reason}, so the state "
                f"dict is no longer the pre-trained model's. {fix}"
            )
    if type(precision) is not Precision and not isinstance(precision, _SUPPORTED_PRECISION_TYPES):
        raise ValueError(f"{who} does not support the precision plugin {type(precision).__name__}. {fix}")
