"""The strategy support table (docs/strategies.md): what is refused, with one clear message, and why.

Supported rows (single device, ddp, ddp_spawn; 32-true, bf16-true, 16-true, bf16-mixed, 16-mixed) are shown by
test_callback*.py, test_merge_module*.py and test_ddp.py. The sharding strategies are refused when fitting or
testing starts; FSDP and ModelParallel run here as real one-process CPU Trainers (refusals.py); DeepSpeed and
XLA cannot be constructed without their packages, so their refusal is checked on the strategy class itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import BitsandbytesPrecision, TransformerEnginePrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy

from lightning_score.utilities.strategies import check_strategy
from tests.experts import MODEL
from tests.processes import run_script

HERE = Path(__file__).resolve().parent
SUPPORTED = "supports a single device, 'ddp', 'ddp_spawn', 'ddp_fork' or 'ddp_notebook'"


def test_fsdp_and_model_parallel_are_refused_when_fitting_or_testing_starts(tmp_path: Path) -> None:
    result = run_script(HERE / "refusals.py", str(tmp_path / "out"), MODEL, timeout=120)
    cases = {row["case"]: row["error"] for row in map(json.loads, result.stdout.splitlines())}
    assert cases["fsdp fit"].startswith("ValueError: ScoreMergeCallback does not support the 'fsdp' strategy")
    assert "FSDP shards the weights" in cases["fsdp fit"] and SUPPORTED in cases["fsdp fit"]
    assert cases["fsdp merge"].startswith("ValueError: MergeModule does not support the 'fsdp' strategy")
    assert cases["model parallel fit"].startswith("ValueError: ScoreMergeCallback does not support the ModelParallel")
    assert cases["files"] == []  # refused before anything was written: no θ₀, no task vector


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (DeepSpeedStrategy, "ZeRO-3 leaves placeholder parameters"),
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
