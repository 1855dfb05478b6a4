"""ScoreMergeCallback: snapshot the pre-trained weights when fitting starts, write the task vector when it ends.

A sibling of Lightning's ``WeightAveraging`` callbacks: settings in ``__init__``, the snapshot taken once
the module is on its device, one override point (:meth:`ScoreMergeCallback.select_module`), rank-zero
writes followed by a barrier, and a ``state_dict()`` holding what a resumed fit needs (the ORIGINAL
pre-trained weights, so that resuming from a checkpoint still yields θ_t − θ₀ and not θ_t − θ_resume).

Optionally it merges the just-trained expert with earlier experts' task vectors at the end of fitting and
swaps the merged weights in while ``trainer.test`` runs, restoring the expert afterwards.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_score.merging import get_method, merge_task_vectors
from lightning_score.task_vector import TaskVector, state_dict_fingerprint

__all__ = ["ScoreMergeCallback"]

log = logging.getLogger(__name__)


class ScoreMergeCallback(Callback):
    """Write the expert's task vector τ = θ_fine-tuned − θ_pre-trained at the end of fitting.

    Attach it to any ``Trainer``. By default it snapshots the module's ``image_encoder`` (what
    :class:`~lightning_score.CLIPExpert` fine-tunes) or, for any other LightningModule, every parameter that
    requires a gradient when fitting starts. Task-vector keys are relative to that submodule.

    Args:
        dirpath: Folder of the task vector; default ``<trainer.default_root_dir>/task_vectors``.
        filename: File name; default ``<name>.safetensors``.
        module: Attribute path of the submodule to snapshot (e.g. ``"model.visual"``); default
            ``"image_encoder"`` when the module has one, else the whole module's trainable parameters.
        name: The expert's name in the task vector's metadata; default its domain (the datamodule's single
            training domain) or the module's class name.
        domain: The expert's domain; default the datamodule's single training domain, if it has one.
        merge_with: Task-vector files of earlier experts (same pre-trained weights). When given, the new
            expert is merged with them at the end of fitting and the merged weights are used while
            ``trainer.test`` runs, then the expert's own weights are restored.
        method: Merge method for ``merge_with`` (see :func:`lightning_score.merging.list_methods`).
        alpha: Scaling coefficient α of the merged update.
        merge_options: Options of the merge method (e.g. ``{"variant": "diagonal"}``).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[ScoreMergeCallback(dirpath="task_vectors")])
        trainer.fit(expert, datamodule)  # writes task_vectors/<domain>.safetensors
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        module: str | None = None,
        name: str | None = None,
        domain: str | None = None,
        merge_with: Sequence[str | Path] | None = None,
        method: str = "score",
        alpha: float = 1.0,
        merge_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.module = module
        self.name = name
        self.domain = domain
        self.merge_with = [Path(p) for p in merge_with or []]
        self.method = method
        self.alpha = alpha
        self.merge_options = dict(merge_options or {})
        if self.merge_with:
            get_method(method).resolve_options(self.merge_options)  # an unknown method/option fails now
        self._pretrained: dict[str, Tensor] | None = None  # θ₀ of the selected submodule, on CPU
        self._module_path: str | None = None
        self._keys: list[str] | None = None
        self._merged: TaskVector | None = None
        self._expert_state: dict[str, Tensor] | None = None
        self.task_vector_path: Path | None = None  #: Where the task vector was written (rank zero).
        self.merged_path: Path | None = None  #: Where the merged task vector was written, with ``merge_with``.

    @property
    def state_key(self) -> str:
        """Distinct per snapshotted submodule, stable across a resume even when the output folder changes.

        One Trainer can carry one callback per submodule.
        """
        return self._generate_state_key(module=self.module)

    # --- the override point -----------------------------------------------------------------------

    def select_module(self, pl_module: pl.LightningModule) -> tuple[nn.Module, list[str] | None]:
        """Choose what to snapshot: ``(submodule, keys or None for all its floating-point entries)``.

        Override to snapshot something else; the submodule's state-dict prefix is found by identity. The
        default follows ``module``; without it, the module's ``image_encoder`` if it has one, else the whole
        module restricted to parameters that require grad.
        """
        if self.module is not None:
            try:
                submodule = operator.attrgetter(self.module)(pl_module)
            except AttributeError:
                raise ValueError(
                    f"ScoreMergeCallback(module={self.module!r}): {type(pl_module).__name__} has no attribute "
                    f"'{self.module}'. Pass the attribute path of the submodule to snapshot, e.g. 'image_encoder'."
                ) from None
            if not isinstance(submodule, nn.Module):
                raise ValueError(
                    f"ScoreMergeCallback(module={self.module!r}) is a {type(submodule).__name__}, not a module."
                )
            return submodule, None
        if isinstance(getattr(pl_module, "image_encoder", None), nn.Module):
            return pl_module.image_encoder, None
        trainable = [name for name, param in pl_module.named_parameters() if param.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(pl_module).__name__} has no trainable parameters when fitting starts, so there is no task "
                "vector to snapshot. Pass ScoreMergeCallback(module='...') naming the submodule you fine-tune."
            )
        return pl_module, trainable

    # --- lifecycle --------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the ``merge_with`` files before any training starts."""
        if stage == "fit" and self.merge_with:
            for path in self.merge_with:
                TaskVector.load(path)  # FileNotFoundError / ValueError naming the file and the fix

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Snapshot θ₀, unless a checkpoint being resumed already restored the original snapshot."""
        submodule, keys = self.select_module(pl_module)
        self._module_path = self._state_prefix(pl_module, submodule)
        if self._pretrained is not None:
            rank_zero_info("ScoreMergeCallback: using the pre-trained weights saved in the checkpoint being resumed.")
            return
        state = self._submodule_state(trainer, self._module_path)
        if keys is None:
            keys = [k for k, v in submodule.state_dict().items() if v.is_floating_point()]
        self._keys = sorted(keys)
        if not self._keys:
            raise ValueError(
                f"The module selected for the task vector ({type(submodule).__name__}) has no floating-point weights."
            )
        if trainer.is_global_zero:  # under FSDP only rank zero holds the gathered full state
            missing = [k for k in self._keys if k not in state]
            if missing:
                raise RuntimeError(f"ScoreMergeCallback: '{missing[0]}' is missing from the gathered state dict.")
        self._pretrained = {k: state[k].detach().to("cpu", copy=True) for k in self._keys if k in state}
        if self.merge_with and trainer.is_global_zero:
            fingerprint = state_dict_fingerprint(self._pretrained)
            for other in self.merge_with:
                other_fp = TaskVector.load(other).base_fingerprint
                if other_fp and other_fp != fingerprint:
                    raise ValueError(
                        f"'{other}' was made from different pre-trained weights than the model being fitted "
                        f"({other_fp[:20]}… vs {fingerprint[:20]}…). merge_with takes experts fine-tuned from the "
                        "same base model."
                    )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write τ = θ − θ₀ (rank zero, atomically), then merge with ``merge_with`` if asked."""
        if self._pretrained is None or self._module_path is None:
            raise RuntimeError(
                "ScoreMergeCallback: fitting ended without a pre-trained snapshot (on_fit_start did not run)."
            )
        state = self._submodule_state(trainer, self._module_path)  # collective under FSDP: every rank calls it
        if trainer.is_global_zero:
            finetuned = {k: state[k].detach().to("cpu") for k in self._pretrained}
            tv = TaskVector.from_state_dicts(self._pretrained, finetuned, **self._metadata(trainer, pl_module))
            self.task_vector_path = tv.save(self._target_path(trainer, tv.name))
            rank_zero_info(f"ScoreMergeCallback: wrote the task vector of '{tv.name}' to {self.task_vector_path}")
            if self.merge_with:
                inputs = [TaskVector.load(self.task_vector_path), *(TaskVector.load(p) for p in self.merge_with)]
                device = pl_module.device if pl_module.device.type == "cuda" else "cpu"
                merged = merge_task_vectors(inputs, self.method, alpha=self.alpha, device=device, **self.merge_options)
                self.merged_path = merged.save(self.task_vector_path.with_name(f"merged-{self.method}.safetensors"))
                rank_zero_info(
                    f"ScoreMergeCallback: merged {len(inputs)} experts with '{self.method}' into {self.merged_path}"
                )
        trainer.strategy.barrier("ScoreMergeCallback.on_fit_end")
        self.task_vector_path = trainer.strategy.broadcast(self.task_vector_path)
        self.merged_path = trainer.strategy.broadcast(self.merged_path)
        if self.merged_path is not None:
            self._merged = TaskVector.load(self.merged_path, lazy=False)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the merged weights in for testing (only when ``merge_with`` produced a merge)."""
        if self._merged is None or self._pretrained is None or self._module_path is None:
            return
        submodule = self._get_submodule(pl_module, self._module_path)
        self._expert_state = {k: v.detach().clone() for k, v in submodule.state_dict().items()}
        merged_weights = self._merged.apply_to(self._pretrained)
        submodule.load_state_dict(merged_weights, strict=False)
        rank_zero_info("ScoreMergeCallback: testing the merged model; the expert's weights come back after the test.")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the expert's own weights after testing the merged ones."""
        if self._expert_state is None or self._module_path is None:
            return
        self._get_submodule(pl_module, self._module_path).load_state_dict(self._expert_state)
        self._expert_state = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Never leave the merged weights in the module when a test is interrupted."""
        self.on_test_end(trainer, pl_module)

    # --- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The original pre-trained weights, so a resumed fit still subtracts θ₀ (not the resume point)."""
        if self._pretrained is None:
            return {}
        return {"module": self._module_path, "keys": self._keys, "pretrained": self._pretrained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the snapshot taken when the interrupted fit first started."""
        if state_dict.get("pretrained") is not None:
            self._pretrained = {k: v.to("cpu") for k, v in state_dict["pretrained"].items()}
            self._keys = list(state_dict["keys"])
            self._module_path = state_dict["module"]

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _state_prefix(pl_module: pl.LightningModule, submodule: nn.Module) -> str:
        """The submodule's name in the module's state dict (``clip.visual`` for ``image_encoder``, say)."""
        for name, candidate in pl_module.named_modules():
            if candidate is submodule:
                return name
        raise ValueError(f"The selected {type(submodule).__name__} is not a submodule of {type(pl_module).__name__}.")

    @staticmethod
    def _get_submodule(pl_module: pl.LightningModule, path: str) -> nn.Module:
        return pl_module.get_submodule(path) if path else pl_module

    @staticmethod
    def _submodule_state(trainer: pl.Trainer, path: str) -> dict[str, Tensor]:
        """The submodule's full state dict, gathered through the strategy (collective under FSDP)."""
        full = trainer.strategy.lightning_module_state_dict()
        if not path:
            return dict(full)
        prefix = path + "."
        return {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}

    def _metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        train_domains = list(getattr(datamodule, "train_domains", None) or [])
        domain = self.domain or (train_domains[0] if len(train_domains) == 1 else None)
        name = self.name or domain or type(pl_module).__name__
        meta: dict[str, Any] = {"name": name, "module": self._module_path or "<trainable parameters>"}
        if domain:
            meta["domain"] = domain
        if train_domains:
            meta["train_domains"] = train_domains
        for attribute in ("base_model", "expert_config"):  # recorded when the module provides them
            value = getattr(pl_module, attribute, None)
            try:
                json.dumps(value)
            except TypeError:
                continue
            if value is not None:
                meta[attribute] = value
        meta["global_step"] = int(trainer.global_step)
        return meta

    def _target_path(self, trainer: pl.Trainer, name: str | None) -> Path:
        dirpath = self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / "task_vectors"
        return dirpath / (self.filename or f"{name}.safetensors")
