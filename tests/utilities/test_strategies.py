"""The strategy support table (docs/strategies.md): what is refused, with one clear message, and why.

Supported rows (single device, ddp, ddp_spawn, fsdp, ModelParallel; 32-true, bf16-true, 16-true, bf16-mixed,
16-mixed) are shown by test_callback*.py, test_merge_module*.py, test_ddp.py and test_sharded.py. DeepSpeed and
XLA are refused; they cannot be constructed without their packages, so their refusal is checked on the strategy
class itself.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import BitsandbytesPrecision, FSDPPrecision, TransformerEnginePrecision
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy

from lightning_score.utilities.strategies import check_strategy

SUPPORTED = (
    "supports a single device, 'ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', 'fsdp' (FSDPStrategy) or "
    "ModelParallelStrategy (FSDP2)"
)


def test_fsdp_and_model_parallel_pass_in_any_supported_precision() -> None:
    """FSDP1 (with its own FSDPPrecision) and FSDP2 are supported (shown by tests/callback/test_sharded.py)."""
    check_strategy(FSDPStrategy(), "ScoreMergeCallback")
    check_strategy(FSDPStrategy(precision_plugin=FSDPPrecision("bf16-mixed")), "MergeModule")
    check_strategy(ModelParallelStrategy(), "ScoreMergeCallback")


def test_deepspeed_is_refused_naming_zero3s_partitioned_parameters_and_pointing_to_fsdp() -> None:
    strategy = object.__new__(DeepSpeedStrategy)  # deepspeed is not installed: the class is what is checked
    with pytest.raises(ValueError, match="ZeRO-3 partitions the parameters") as error:
        check_strategy(strategy, "ScoreMergeCallback")
    assert "shard the model with 'fsdp' (FSDPStrategy) or ModelParallelStrategy (FSDP2) instead" in str(error.value)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (DeepSpeedStrategy, "ZeRO-3 partitions the parameters, leaving size-0 placeholders"),
        (XLAStrategy, "XLA keeps the weights on TPU devices"),
        (SingleDeviceXLAStrategy, "XLA keeps the weights on a TPU device"),
    ],
)
def test_strategies_that_need_missing_packages_are_refused_by_class(kind: type, reason: str) -> None:
    strategy = object.__new__(kind)  # deepspeed / torch_xla are not installed: the class is what is checked
    with pytest.raises(ValueError, match=reason) as error:
        check_strategy(strategy, "ScoreMergeCallback")
    assert SUPPORTED in str(error.value)


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [(BitsandbytesPrecision, "replaces the linear layers with quantised ones"),
     (TransformerEnginePrecision, "replaces the linear layers with its own")],
)  # fmt: skip
def test_precision_plugins_that_replace_layers_are_refused(plugin: type, reason: str) -> None:
    strategy = SingleDeviceStrategy(device=torch.device("cpu"), precision_plugin=object.__new__(plugin))
    with pytest.raises(ValueError, match=reason):
        check_strategy(strategy, "MergeModule")


def test_the_supported_strategies_pass() -> None:
    check_strategy(SingleDeviceStrategy(device=torch.device("cpu")), "ScoreMergeCallback")
    for start_method in ("popen", "spawn", "fork"):  # ddp, ddp_spawn, ddp_fork / ddp_notebook
        check_strategy(DDPStrategy(start_method=start_method), "ScoreMergeCallback")
