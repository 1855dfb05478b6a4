"""Sharding strategies on CPU processes, for the multi-process tests (FSDP1 and FSDP2 over gloo).

* :class:`CPUFSDPStrategy`: TEST ONLY. Lightning's ``FSDPStrategy`` whose only change is the device FSDP is given:
  Lightning passes ``device_id=root_device.index``, which is None on a CPU, and torch's FSDP then refuses ("FSDP
  needs a non-CPU accelerator device"); this passes ``device_id=torch.device("cpu")``. Everything else (the wrap,
  the auto-wrap policy, activation checkpointing, checkpoints) is Lightning's own code. (Subclassing also passes
  Lightning's check for a GPU, which looks at the exact strategy type.) The product code never depends on it: on
  GPUs ``FSDPStrategy`` itself is used.
* :func:`model_parallel`: the real ``ModelParallelStrategy`` (FSDP2), unmodified, data parallel over 2 processes.
* :class:`ShardedRegressor`: :class:`tests.modules.Regressor` whose ``configure_model`` applies ``fully_shard`` to
  each of its linear layers and to itself under ``ModelParallelStrategy`` (and does nothing otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from tests.modules import Regressor

__all__ = ["CPUFSDPStrategy", "ShardedRegressor", "model_parallel", "strategy"]


class CPUFSDPStrategy(FSDPStrategy):
    """TEST ONLY: ``FSDPStrategy`` on CPU processes; its only change is ``device_id=torch.device("cpu")``."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(part, FullyShardedDataParallel) for part in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
            )  # fmt: skip
        policy = self.kwargs.pop("auto_wrap_policy", None)  # already applied above: Lightning would warn
        try:
            return super()._setup_model(model)  # wrapped: Lightning's own remaining steps (activation checkpointing)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy


def model_parallel(**kwargs: Any) -> ModelParallelStrategy:
    """The real ``ModelParallelStrategy``: FSDP2 over 2 processes, full state dicts in checkpoints unless told."""
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kwargs)


def strategy(kind: str, **kwargs: Any) -> Any:
    """``"ddp"``, ``"fsdp"`` (use_orig_params=True), ``"fsdp_flat"`` (use_orig_params=False, activation
    checkpointing of the linear layers) or ``"fsdp2"``.
    """
    if kind == "ddp":
        return "ddp"
    if kind == "fsdp":
        return CPUFSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=True, **kwargs)
    if kind == "fsdp_flat":
        return CPUFSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=False,
                               activation_checkpointing_policy={nn.Linear}, **kwargs)  # fmt: skip
    if kind == "fsdp2":
        return model_parallel(**kwargs)
    raise ValueError(kind)


class ShardedRegressor(Regressor):
    """A :class:`Regressor` that FSDP2 shards per linear layer (``configure_model``); plain elsewhere.

    SGD with momentum: the optimiser has a state, which a sharded checkpoint must carry for a resume.
    """

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum over the trainable parameters."""
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: ``fully_shard`` each linear layer, then the whole module."""
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for part in self.modules():
            if isinstance(part, nn.Linear):
                fully_shard(part, mesh=mesh)
        fully_shard(self, mesh=mesh)
