"""Full weights in and out of a module sharded by FSDP (``FSDPStrategy``) or FSDP2 (``ModelParallelStrategy``).

Under these strategies no process holds the whole module once the strategy has wrapped it: FSDP1 keeps flat
shards inside ``FullyShardedDataParallel`` units, FSDP2 (``fully_shard``) keeps each parameter as a ``DTensor``.
The train-then-merge layer needs the full weights twice (θ₀ when fitting starts, θ_T when it ends) and loads full
weights back (the merge, for testing). Both go through ``torch.distributed.checkpoint.state_dict``:

* :func:`gather_full_state`: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective that
  every rank of the Trainer must enter; rank zero receives the full tensors on CPU (one gathered copy), every other
  rank an empty dict, so no other rank holds more than its shard.
* :func:`load_full_state`: ``set_model_state_dict(full_state_dict=True)``: every rank passes the full tensors of
  the keys to load and keeps its own shard of them.

Keys are the unwrapped module's: ``torch.distributed.checkpoint`` leaves out ``_fsdp_wrapped_module.`` and
``_checkpoint_wrapped_module.``. Before the strategy wraps the module (in ``setup``) every process holds it whole,
and :func:`is_sharded` is False: the callers read and write the live tensors as under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn

__all__ = ["SHARDED_STRATEGIES", "gather_full_state", "is_sharded", "load_full_state", "sharding_root"]

SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, ModelParallelStrategy)
"""The strategies whose module this module gathers and loads (FSDP1 and FSDP2, with or without a TP plan)."""


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

    Args:
        root: The sharded module (:func:`sharding_root`).
        state: Full tensors by the root's state-dict keys; the keys left out keep their values.

    Raises:
        KeyError: A key of ``state`` is not one of the module's.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    result = set_model_state_dict(root, dict(state), options=options)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise KeyError(f"The sharded module has no entries {unexpected[:3]} to load the full weights into.")
