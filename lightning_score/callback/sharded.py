"""ScoreMergeCallback's weights under FSDP (``FSDPStrategy``) and FSDP2 (``ModelParallelStrategy``).

The callback reads the selected weights three times and writes them twice; under a sharding strategy each step
goes through :mod:`lightning_score.utilities.strategies`, in the order of a fit:

1. ``setup``: the strategy has not wrapped the module yet, every process holds it whole: θ₀ is the live weights
   (:func:`current_state` reads them as under DDP) and rank zero writes it.
2. ``on_fit_start``: the module is sharded; :func:`current_state` gathers it (every rank enters the collective,
   rank zero receives the full weights on CPU, the others nothing) to check that it still holds θ₀, or to take θ₀
   afresh when ``configure_model`` changed it.
3. ``on_train_end``: θ_T gathered the same way; rank zero writes τ = θ_T − θ₀.
4. ``on_test_start`` / ``on_test_end`` (``merge_with``): :func:`keep_own` keeps each rank's own shard of the
   expert's weights, :func:`load_selected` loads θ₀ + τ* (every rank reads the files and keeps its shard) and
   :func:`restore_own` puts the shards back.

Every rank decides what to do from the same facts (the strategy, the module), so a refusal here is raised on
every rank before any collective, never on one rank while the others wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_score.callback.records import Selection, clean_key
from lightning_score.utilities.strategies import gather_full_state, load_full_state, sharding_root

__all__ = ["current_state", "keep_own", "load_selected", "restore_own"]


def _root(trainer: pl.Trainer | None, selection: Selection, loading: bool = False) -> Any:
    root = sharding_root(trainer.strategy if trainer is not None else None, selection.submodule)
    if root is None or trainer is None:
        return None
    if selection.adapted:
        raise ValueError(
            f"ScoreMergeCallback: the selected module ({type(selection.submodule).__name__}) holds PEFT adapters and "
            f"is sharded by {type(trainer.strategy).__name__}; the task vector of an adapted module is computed from "
            "its layers, which FSDP does not hold whole. Fine-tune LoRA experts under 'ddp'."
        )
    if loading and getattr(trainer.strategy, "kwargs", {}).get("use_orig_params") is False:
        raise ValueError(
            "ScoreMergeCallback(merge_with=...) cannot load the merged weights into a module that FSDPStrategy "
            "wraps with use_orig_params=False (torch's full-state load into flat parameters needs every key). "
            "Use use_orig_params=True (Lightning's default), or test the merged task vector with MergeModule."
        )
    return root


def _prefixed(selection: Selection) -> str:
    return f"{selection.prefix}." if selection.prefix else ""


def current_state(trainer: pl.Trainer, selection: Selection) -> dict[str, Tensor]:
    """The selected weights as they are now, by task-vector key.

    Unsharded: the live tensors (:meth:`Selection.live_state`). Sharded: a collective (every rank must call it)
    whose result is the full weights on CPU on rank zero and ``{}`` on every other rank; a key the module no
    longer has is left out, for rank zero's checks to name.

    Args:
        trainer: The Trainer (its strategy and rank).
        selection: What the task vector covers.
    """
    root = _root(trainer, selection)
    if root is None:
        return selection.live_state()
    full = {clean_key(key): value for key, value in gather_full_state(root).items()}
    if not trainer.is_global_zero:
        return {}
    prefix = _prefixed(selection)
    return {key: full[prefix + key] for key in selection.keys if prefix + key in full}


def keep_own(trainer: pl.Trainer | None, selection: Selection) -> dict[str, Any]:
    """The selected submodule's own weights, to put back after a test: a CPU copy, or this rank's shards."""
    root = _root(trainer, selection, loading=True)
    if root is None:
        return {key: value.detach().to("cpu", copy=True) for key, value in selection.submodule.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    shards = get_model_state_dict(root, options=StateDictOptions(full_state_dict=False))
    prefix = _prefixed(selection)
    return {key: value.detach().clone() for key, value in shards.items() if key.startswith(prefix)}


def load_selected(trainer: pl.Trainer | None, selection: Selection, weights: Mapping[str, Tensor]) -> None:
    """Load ``weights`` (full tensors by task-vector key, the same on every rank) into the selected entries.

    Unsharded, each live tensor keeps its dtype and device; sharded, every rank keeps its shard.
    """
    root = _root(trainer, selection, loading=True)
    if root is None:
        with torch.no_grad():
            for key, live in selection.live_state().items():
                live.copy_(weights[key])
        return
    prefix = _prefixed(selection)
    load_full_state(root, {prefix + key: weights[key] for key in selection.keys})


def restore_own(trainer: pl.Trainer, selection: Selection, own: dict[str, Any]) -> None:
    """Put back what :func:`keep_own` kept (every rank its own shards, under a sharding strategy)."""
    root = sharding_root(trainer.strategy, selection.submodule)
    if root is None:
        selection.submodule.load_state_dict(own)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(root, own, options=StateDictOptions(full_state_dict=False, strict=False))
