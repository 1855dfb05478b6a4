"""MergeModule: merge the experts' task vectors in ``setup``, then test on held-out domains.

``Trainer.test(MergeModule(...), DomainDataModule(train_domains=sources, test_domains=[target]))`` is one
leave-one-domain-out evaluation: the merge runs on the Trainer's device (the GPU when it has one), split
across ranks under DDP, and the test loop of :class:`~lightning_score.classifier.CLIPClassifier` logs
``test/<domain>/acc`` and ``test/<domain>/balanced_acc``.

Modes:

* ``merge``: θ = θ₀ + α·τ*, τ* from :func:`~lightning_score.merging.merge_task_vectors` with ``method``.
* ``zeroshot``: θ₀ as it is.
* ``expert``: one task vector applied, θ₀ + α·τ.
* ``ensemble``: the average of the experts' logits (one image encoder per expert, T× inference cost).
"""

from __future__ import annotations

import copy
import json
import logging
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_score.classifier import CLIPClassifier
from lightning_score.merging import get_method, merge_task_vectors
from lightning_score.merging.esm import ESM_TARGETS
from lightning_score.models import save_clip_weights
from lightning_score.profiling import Measure
from lightning_score.task_vector import TaskVector

__all__ = ["MODES", "MergeModule"]

log = logging.getLogger(__name__)

Mode = Literal["merge", "zeroshot", "ensemble", "expert"]
MODES: tuple[str, ...] = ("merge", "zeroshot", "ensemble", "expert")
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)


def _cost(shape: tuple[int, ...]) -> int:
    """Rough relative cost of merging one key: m·n·r for matrices, the entry count otherwise."""
    if len(shape) == 2:
        return shape[0] * shape[1] * min(shape)
    size = 1
    for dim in shape:
        size *= dim
    return size


def shard_keys(shapes: Mapping[str, tuple[int, ...]], world_size: int) -> list[list[str]]:
    """Split keys into ``world_size`` shares of about equal merge cost (largest first, to the lightest share).

    Deterministic, so every rank computes the same split without communicating.
    """
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for key in sorted(shapes, key=lambda k: (-_cost(shapes[k]), k)):
        lightest = loads.index(min(loads))
        shares[lightest].append(key)
        loads[lightest] += _cost(shapes[key])
    return shares


class MergeModule(CLIPClassifier):
    """A CLIP model whose image encoder is merged from experts' task vectors, tested per domain.

    Args:
        model_name: open_clip architecture of the pre-trained model the experts share.
        pretrained: Its weights: an open_clip tag, a local weights file, ``"builtin:digits"`` or ``None``.
        task_vectors: The experts' task-vector files (``.safetensors``), one per source domain.
        method: Merge method for ``mode="merge"`` (see ``lightning_score.merging.list_methods()``).
        mode: ``merge``, ``zeroshot``, ``ensemble`` (logit ensemble of the experts) or ``expert`` (one task
            vector applied).
        alpha: The scaling coefficient α, or ``"auto"`` to choose it on the source domains' validation split
            from ``alpha_grid`` (the choice is logged and kept in :attr:`alpha_search`).
        method_options: Options of the merge method, e.g. ``{"variant": "diagonal"}``.
        alpha_grid: Candidate values for ``alpha="auto"``.
        proxy_images: Unlabelled images per source domain for data-dependent methods (ESM).
        merge_device: Where to merge; default the Trainer's device.
        templates: Prompt-template set of the zero-shot head (see :class:`CLIPClassifier`).
        classnames: Class names of the head; default the datamodule's.
        head_cache: Read/write zero-shot heads from/to the disk cache.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        task_vectors: list[str] | None = None,
        method: str = "score",
        mode: Mode = "merge",
        alpha: float | str = 1.0,
        method_options: dict[str, Any] | None = None,
        alpha_grid: list[float] | None = None,
        proxy_images: int = 32,
        merge_device: str | None = None,
        templates: str = "auto",
        classnames: list[str] | None = None,
        head_cache: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}.")
        if isinstance(alpha, str) and alpha != "auto":
            raise ValueError(f"alpha must be a number or 'auto', got {alpha!r}.")
        self.method = method
        self.method_options = dict(method_options or {})
        if mode == "merge":
            spec = get_method(method)  # unknown method: a clear error before loading anything
            spec.resolve_options({k: v for k, v in self.method_options.items() if k != "activations"})
        super().__init__(model_name, pretrained, templates, classnames, head_cache)
        self.mode = mode
        self.alpha = alpha
        self.alpha_grid = list(alpha_grid or DEFAULT_ALPHA_GRID)
        self.proxy_images = proxy_images
        self.merge_device = merge_device
        self.task_vector_paths = [Path(p) for p in task_vectors or []]
        self._task_vectors = self._load_task_vectors()
        self._pretrained_state = {k: v.detach().clone() for k, v in self.image_encoder.state_dict().items()}
        self.experts = nn.ModuleList()
        self.merged: TaskVector | None = None  #: τ* at α = 1 (mode ``merge``), on CPU.
        self.merge_seconds: float | None = None  #: Wall time of the merge (including ESM's activations).
        self.merge_peak_bytes: int | None = None  #: Memory growth during the merge on the merge device.
        self.alpha_search: dict[str, Any] | None = None  #: The grid and validation accuracies of ``alpha="auto"``.
        self._prepared = False

    # --- inputs, checked before any long work ----------------------------------------------------

    def _load_task_vectors(self) -> list[TaskVector]:
        needed = {"merge": (1, None), "ensemble": (1, None), "expert": (1, 1), "zeroshot": (0, None)}[self.mode]
        count = len(self.task_vector_paths)
        if count < needed[0] or (needed[1] is not None and count > needed[1]):
            wanted = "exactly one task vector" if self.mode == "expert" else "at least one task vector"
            raise ValueError(f"MergeModule(mode='{self.mode}') needs {wanted}; got {count}: pass task_vectors=[...].")
        if self.mode == "zeroshot" and count:
            rank_zero_info("MergeModule(mode='zeroshot') ignores its task vectors.")
            return []
        tvs = [TaskVector.load(path) for path in self.task_vector_paths]  # missing / not a task vector: clear errors
        encoder_keys = set(self.image_encoder.state_dict())
        for tv in tvs:
            if tv.base_fingerprint and tv.base_fingerprint != self.pretrained_fingerprint:
                raise ValueError(
                    f"{tv.describe()} was made from different pre-trained weights than {self.base_model} "
                    f"(base fingerprint {tv.base_fingerprint[:20]}… vs {self.pretrained_fingerprint[:20]}…). "
                    "Merge experts into the model they were fine-tuned from: check model_name and pretrained."
                )
            extra = sorted(set(tv) - encoder_keys)
            if extra:
                raise ValueError(
                    f"{tv.describe()} has key '{extra[0]}' that {self.model_name}'s image encoder lacks: it is not a "
                    "task vector of this architecture's image encoder."
                )
        return tvs

    # --- setup: build the weights once ------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Build the head (see :class:`CLIPClassifier`), then the weights of the chosen mode, once."""
        super().setup(stage)
        if self._prepared:
            return
        if self.mode == "expert":
            self._load_encoder(self._task_vectors[0].apply_to(self._pretrained_state, alpha=self._numeric_alpha()))
        elif self.mode == "ensemble":
            self._build_ensemble()
        elif self.mode == "merge":
            self.merged = self.merge()
            alpha = self.choose_alpha() if self.alpha == "auto" else float(self.alpha)
            self._load_encoder(self.merged_weights(alpha))
            rank_zero_info(f"MergeModule: '{self.method}' of {len(self._task_vectors)} experts at α = {alpha:g}.")
        self._prepared = True

    def _numeric_alpha(self) -> float:
        if self.alpha == "auto":
            raise ValueError(f"alpha='auto' applies to mode='merge' only, not mode='{self.mode}'.")
        return float(self.alpha)

    def _compute_device(self) -> torch.device:
        if self.merge_device is not None:
            return torch.device(self.merge_device)
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _load_encoder(self, state: Mapping[str, Tensor]) -> None:
        self.image_encoder.load_state_dict(dict(state), strict=True)

    def merge(self) -> TaskVector:
        """Merge the task vectors (at α = 1) on the compute device; under DDP each rank merges a share of the keys.

        Returns:
            τ* on CPU. :attr:`merge_seconds` and :attr:`merge_peak_bytes` record the cost.
        """
        device = self._compute_device()
        options = dict(self.method_options)
        with Measure(device) as measure:
            if get_method(self.method).needs_data:
                options["activations"] = self.collect_activations(device)
            merged = self._merge_sharded(device, options)
        self.merge_seconds, self.merge_peak_bytes = measure.seconds, measure.peak_bytes
        rank_zero_info(
            f"MergeModule: merged {len(self._task_vectors)} task vectors with '{self.method}' on {device} in "
            f"{measure.seconds:.1f} s (peak memory +{measure.peak_bytes / 2**20:.0f} MiB)."
        )
        return merged

    def _merge_sharded(self, device: torch.device, options: dict[str, Any]) -> TaskVector:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or not get_method(self.method).shardable:
            return merge_task_vectors(self._task_vectors, self.method, device=device, **options)
        shapes = {k: self._task_vectors[0].tensor_spec(k)[0] for k in self._task_vectors[0]}
        share = shard_keys(shapes, world)[dist.get_rank()]
        local = merge_task_vectors(self._task_vectors, self.method, device=device, keys=share, **options)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, ({k: local[k] for k in local}, local.metadata))
        tensors = {k: v for part, _ in gathered for k, v in part.items()}
        metadata = gathered[0][1]
        metadata["merge"]["sharded_over_ranks"] = world
        metadata["merge"]["alpha_exempt_keys"] = sorted(
            {k for _, meta in gathered for k in meta["merge"]["alpha_exempt_keys"]}
        )
        return TaskVector({k: tensors[k] for k in shapes}, metadata)

    def merged_weights(self, alpha: float) -> dict[str, Tensor]:
        """θ₀ + α·τ* for the image encoder (keys the method exempts from α get τ* as it is)."""
        assert self.merged is not None
        exempt = set(self.merged.metadata.get("merge", {}).get("alpha_exempt_keys", []))
        out = dict(self._pretrained_state)
        for key in self.merged:
            base = self._pretrained_state[key]
            scale = 1.0 if key in exempt else alpha
            out[key] = (base.double() + scale * self.merged[key].double()).to(base.dtype)
        return out

    # --- alpha on the source domains' validation split ---------------------------------------------

    def choose_alpha(self) -> float:
        """Pick α from :attr:`alpha_grid` by top-1 accuracy on the source domains' validation split."""
        datamodule = self._datamodule()
        loader = datamodule.val_dataloader() if datamodule is not None else []
        if not loader:
            raise ValueError(
                "alpha='auto' chooses α on the source domains' validation split, but the datamodule has none: "
                "give it train_domains (the sources) and val_fraction > 0, or set a number for alpha."
            )
        device = self._compute_device()
        self.clip.to(device)
        assert self.head is not None
        self.head.to(device)
        accuracies = []
        for alpha in self.alpha_grid:
            self._load_encoder(self.merged_weights(alpha))
            correct = total = 0
            with torch.no_grad():
                for images, labels in loader:
                    logits = self.head(F.normalize(self.image_encoder(images.to(device)), dim=-1))
                    correct += int((logits.argmax(-1).cpu() == labels).sum())
                    total += len(labels)
            accuracies.append(correct / max(total, 1))
        best = max(range(len(accuracies)), key=lambda i: (accuracies[i], -abs(self.alpha_grid[i] - 1.0)))
        self.alpha_search = {"grid": self.alpha_grid, "val_acc": accuracies, "selected": self.alpha_grid[best]}
        table = ", ".join(f"{a:g}: {acc:.3f}" for a, acc in zip(self.alpha_grid, accuracies, strict=True))
        rank_zero_info(
            f"MergeModule: α search on the source validation split ({table}); chose α = {self.alpha_grid[best]:g}."
        )
        return self.alpha_grid[best]

    # --- ESM's proxy activations -------------------------------------------------------------------

    def collect_activations(self, device: torch.device) -> list[dict[str, Tensor]]:
        """Run each expert on a few unlabelled images of its own (source) domain; record its target layers' inputs.

        Returns:
            One mapping per task vector: weight key → layer inputs ``[images × tokens, width]`` (on CPU).
        """
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "proxy_dataloader"):
            raise ValueError(f"Method '{self.method}' needs unlabelled source images: test with a DomainDataModule.")
        targets = [k for k in self._pretrained_state if k.endswith(ESM_TARGETS)]
        test_domains = set(getattr(datamodule, "test_domains", []) or [])
        activations = []
        for tv in self._task_vectors:
            if not tv.domain:
                raise ValueError(
                    f"{tv.describe()} does not record its domain, which '{self.method}' needs to draw proxy images."
                )
            if tv.domain in test_domains:
                raise ValueError(
                    f"{tv.describe()} is the expert of '{tv.domain}', a test domain: '{self.method}' never uses "
                    "target-domain images. Merge only source-domain experts."
                )
            expert = copy.deepcopy(self.image_encoder).to(device)
            expert.load_state_dict(tv.apply_to(self._pretrained_state))
            activations.append(
                self._layer_inputs(expert, targets, datamodule.proxy_dataloader(tv.domain, self.proxy_images), device)
            )
            del expert
        return activations

    @staticmethod
    def _layer_inputs(
        encoder: nn.Module, targets: Sequence[str], loader: Any, device: torch.device
    ) -> dict[str, Tensor]:
        captured: dict[str, list[Tensor]] = {key: [] for key in targets}
        handles = []
        for key in targets:
            module_path = key.removesuffix(".in_proj_weight").removesuffix(".weight")
            module = operator.attrgetter(module_path)(encoder)

            def hook(_: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
                captured[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu"))

            handles.append(module.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                for batch in loader:
                    images = batch[0] if isinstance(batch, list | tuple) else batch
                    encoder(images.to(device))
        finally:
            for handle in handles:
                handle.remove()
        return {key: torch.cat(chunks) for key, chunks in captured.items()}

    # --- the logit ensemble ------------------------------------------------------------------------

    def _build_ensemble(self) -> None:
        experts = []
        for tv in self._task_vectors:  # one after another: each expert's weights are read once
            expert = copy.deepcopy(self.image_encoder)
            expert.load_state_dict(tv.apply_to(self._pretrained_state, alpha=self._numeric_alpha()))
            experts.append(expert)
        self.experts = nn.ModuleList(experts)

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the merged (or zero-shot, or expert) model; in ``ensemble`` mode the experts' mean logits."""
        if self.mode != "ensemble" or len(self.experts) == 0:
            return super().forward(images)
        assert self.head is not None
        logits = [self.head(F.normalize(expert(images), dim=-1)) for expert in self.experts]
        return torch.stack(logits).mean(dim=0)

    def on_test_epoch_end(self) -> None:
        """Log the per-domain metrics, and α when it was searched."""
        super().on_test_epoch_end()
        if self.alpha_search is not None:
            self.log("alpha", float(self.alpha_search["selected"]), sync_dist=False)

    # --- output ------------------------------------------------------------------------------------

    def save_merged(self, path: str | Path) -> Path:
        """Write the whole CLIP model with its merged image encoder, loadable as ``pretrained=path``.

        The header records the merge (method, options, α, inputs) as JSON under ``lightning_score_merge``.
        """
        if self.mode == "ensemble":
            raise ValueError("An ensemble is T models, not one set of weights: there is nothing to save as a merge.")
        record = {"mode": self.mode, "base_model": self.base_model, "alpha": self.alpha}
        if self.alpha_search is not None:
            record["alpha_search"] = self.alpha_search
        if self.merged is not None:
            record["merge"] = self.merged.metadata.get("merge", {})
        record["task_vectors"] = [str(p) for p in self.task_vector_paths]
        return save_clip_weights(
            self.clip, path, model_name=self.model_name, metadata={"lightning_score_merge": json.dumps(record)}
        )
