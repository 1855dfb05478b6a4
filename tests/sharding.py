"""Sharding strategies on CPU processes, for the multi-process tests (FSDP1 and FSDP2 over gloo).

* :class:`CPUFSDPStrategy`: TEST ONLY. Lightning's ``FSDPStrategy`` whose only change is the device FSDP is given:
  Lightning passes ``device_id=root_device.index``, which is None on a CPU, and torch's FSDP then refuses ("FSDP
  needs a non-CPU accelerator device"); this passes ``device_id=torch.device("cpu")``. Everything else (the wrap,
  the auto-wrap policy, activation checkpointing, checkpoints) is Lightning's own code. (Subclassing also passes
  Lightning's check for a GPU, which looks at the exact strategy type.) The product code never depends on it: on
  GPUs ``FSDPStrategy`` itself is used.
* :func:`model_parallel`: the real ``ModelParallelStrategy`` (FSDP2), unmodified, data parallel over 2 processes.
* :class:`ShardedRegressor`: :class:`tests.modules.Regressor` whose ``configure_model`` applies ``fully_shard`` to
  each of its linear layers and to itself under ``ModelParallelStrategy`` (and does nothing otherwise); with
  ``compile`` it shards its head as one unit and then compiles it (:class:`CompilableHead`), in place as
  ``CLIPExpert(compile_image_encoder=True)`` does, or wrapped by ``torch.compile``.
* :class:`TensorParallelRegressor`: the same module split by a tensor-parallel plan instead (torch's
  ``parallelize_module``: the head's first linear layer column-wise, its second row-wise), over the mesh's
  ``tensor_parallel`` dimension (``"tp"``: ``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from tests.modules import Regressor

__all__ = [
    "CPUFSDPStrategy",
    "CompilableHead",
    "ShardedRegressor",
    "TensorParallelRegressor",
    "model_parallel",
    "strategy",
]


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
    checkpointing of the linear layers), ``"fsdp2"`` or ``"tp"`` (tensor parallel over 2 processes, no data
    parallelism: every rank sees every batch).
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
    if kind == "tp":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, **kwargs)
    raise ValueError(kind)


class CompilableHead(nn.Sequential):
    """The head's layers (the same keys as the ``nn.Sequential``) under a forward written here, without a loop.

    Dynamo does not start a frame of its own in torch's modules (``nn.Sequential.forward``): once FSDP's hooks
    break the graph, nothing of a plain ``nn.Sequential`` would be compiled. This forward is traced whole.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The three layers in turn."""
        return self[2](self[1](self[0](x)))


class ShardedRegressor(Regressor):
    """A :class:`Regressor` that FSDP2 shards per linear layer (``configure_model``); plain elsewhere.

    SGD with momentum: the optimiser has a state, which a sharded checkpoint must carry for a resume.

    Args:
        compile: After sharding, compile the head (a :class:`CompilableHead`, which FSDP2 then shards as one unit,
            as CLIP's image encoder is one): ``"in_place"`` (``self.head.compile()``, as ``CLIPExpert`` does: the
            keys do not change) or ``"wrapped"`` (``self.head = torch.compile(self.head)``: the keys gain
            ``_orig_mod.``). None: not compiled.
        backend: The ``torch.compile`` backend.
        **kwargs: :class:`Regressor`'s.
    """

    def __init__(self, compile: str | None = None, backend: str = "aot_eager", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compile_mode, self.backend, self._compiled = compile, backend, False
        if compile is not None:
            self.head = CompilableHead(*self.head)
            if kwargs.get("encoder_attr"):
                self.image_encoder = self.head

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum over the trainable parameters."""
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: ``fully_shard`` each linear layer, then the whole module; then compile."""
        self._shard()
        if self.compile_mode is None or self._compiled:
            return
        self._compiled = True
        if self.compile_mode == "in_place":
            self.head.compile(backend=self.backend)
        else:
            self.head = torch.compile(self.head, backend=self.backend)

    def _shard(self) -> None:
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        units = [self.head] if self.compile_mode else [part for part in self.modules() if isinstance(part, nn.Linear)]
        for part in units:
            fully_shard(part, mesh=mesh)
        fully_shard(self, mesh=mesh)


class TensorParallelRegressor(ShardedRegressor):
    """A :class:`ShardedRegressor` whose head a tensor-parallel plan splits over the ``tensor_parallel`` mesh.

    ``head.0`` (8 → width) column-wise (its weight and bias are sharded by output row), ``head.2`` (width → 1)
    row-wise (its weight sharded by input column, its bias replicated); the frozen backbone stays whole.
    """

    def _shard(self) -> None:
        if self._device_mesh is None:
            return
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if isinstance(self.head[0].weight, DTensor):  # fit, then test: parallelised once
            return
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        parallelize_module(self.head, self.device_mesh["tensor_parallel"], plan)
