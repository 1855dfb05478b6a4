"""MergeModule: merge the experts' task vectors in ``setup``, then test on held-out domains.

``Trainer.test(MergeModule(...), DomainDataModule(train_domains=sources, test_domains=[target]))`` is one
leave-one-domain-out evaluation: the merge runs on the Trainer's device (the GPU when it has one), split
across the Trainer's ranks under DDP, and the test loop of :class:`~lightning_score.classifier.CLIPClassifier`
logs ``test/<domain>/acc`` and ``test/<domain>/balanced_acc``.

Modes:

* ``merge``: θ = θ₀ + α·τ*, τ* from :func:`~lightning_score.merging.merge_task_vectors` with ``method``.
  τ* is computed once; :meth:`MergeModule.use_alpha` reloads the weights at another α without re-merging.
* ``zeroshot``: θ₀ as it is.
* ``expert``: one task vector applied, θ₀ + α·τ.
* ``ensemble``: the average of the experts' logits (one image encoder per expert, T× inference cost).

Everything data-dependent (α search; the statistics of the data-using methods: ESM's layer inputs, RegMean's
Gram matrices, Fisher merging's diagonal Fishers, see :mod:`lightning_score.merge_module.statistics`) reads the
sources' validation data only (``datamodule.val_dataloader()`` and ``datamodule.proxy_dataloader(domain, n)``),
never a test loader.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

import lightning_score.merge_module.outputs as outputs
import lightning_score.merge_module.records as records
from lightning_score.classifier import CLIPClassifier
from lightning_score.merge_module.alpha import DEFAULT_ALPHA_GRID, AlphaSearchResult, search_alpha
from lightning_score.merge_module.ensemble import ensemble_logits, expert_encoders
from lightning_score.merge_module.inputs import (
    NOT_HELD_OUT,
    MergeInputs,
    Mode,
    check_arguments,
    check_count,
    held_out,
    read_inputs,
)
from lightning_score.merge_module.matrices import check_convention, from_matrices, to_matrices
from lightning_score.merge_module.passes import ready_for_passes, validation_accuracy, validation_loaders
from lightning_score.merge_module.sharding import merge_on_ranks
from lightning_score.merge_module.statistics import collect_statistics
from lightning_score.merging import FactorCache
from lightning_score.models.backbones import get_backbone
from lightning_score.models.conventions import QKVConvention
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.files import ensure_writable
from lightning_score.utilities.profiling import Measure
from lightning_score.utilities.ranks import on_rank_zero
from lightning_score.utilities.strategies import check_strategy, load_submodule_state

__all__ = ["MergeModule", "describe_options"]

describe_options = records.describe_options  # where the console's helper moved (see the CHANGELOG)


class MergeModule(CLIPClassifier):
    """A CLIP model whose image encoder is merged from experts' task vectors, tested per domain.

    Args:
        model_name: open_clip architecture of the pre-trained model the experts share.
        pretrained: Its weights: an open_clip tag, a local weights file, ``"builtin:digits"`` or ``None``.
        task_vectors: The experts' task-vector files (``.safetensors``), one per source domain.
        method: Merge method for ``mode="merge"`` (see ``lightning_score.merging.list_methods()``).
        mode: ``merge``, ``zeroshot``, ``ensemble`` (logit ensemble of the experts) or ``expert`` (one task
            vector applied).
        alpha: The scaling coefficient α, or ``"auto"`` to choose it by accuracy on the source domains'
            validation data (the search is logged, and kept as :attr:`alpha_search_result`).
        method_options: Options of the merge method, e.g. ``{"variant": "diagonal"}``.
        alpha_grid: Candidate values of ``alpha="auto"`` with ``alpha_search="grid"``.
        alpha_search: How ``alpha="auto"`` searches: ``"grid"`` (every value of ``alpha_grid``, the default)
            or ``"golden"`` (golden-section search on [0, 2] to a 0.01-wide bracket, as the ESM authors tune α).
        proxy_images: Unlabelled images per source domain from which the data-using methods' statistics are
            collected (ESM, RegMean, Fisher; see :mod:`lightning_score.merge_module.statistics`).
        merge_device: Where to merge; default the Trainer's device.
        templates: Prompt-template set of the zero-shot head (see :class:`CLIPClassifier`).
        classnames: Class names of the head; default the datamodule's.
        head_cache: Read/write zero-shot heads from/to the disk cache.
        factors: A :class:`~lightning_score.merging.FactorCache` shared with other merges of the same experts
            (e.g. every row and target of a leave-one-domain-out study): the SVD-based methods (SCORE, TSV-M,
            Iso-CTS, ESM's TSV layers) then compute each expert's factorizations once. The merge is
            bit-identical with and without it on one device. Not a hyperparameter: checkpoints do not keep it.
        allow_target_experts: Test on a domain an expert was fine-tuned on (its ``domain`` or ``train_domains``):
            refused by default (not held out); allowed, with a warning, as ``test/<domain> (not held out)/...``.
            ``mode="expert"`` (one expert, e.g. the target's own: an upper bound) is never refused.
        qkv: The merge's matrix convention (:mod:`~.matrices`): ``"fused"``, the papers' (q/k/v as one matrix in
            every library), or ``"split"``, FusionBench's (three matrices).
        backbone: The experts' library, ``"open_clip"``, ``"hf"`` or ``"timm"``, and ``backbone_options`` its
            settings (see :class:`~lightning_score.classifier.CLIPClassifier`).

    The arguments are checked here; the task-vector files are read in ``setup``, first. ``load_from_checkpoint``
    restores the merged weights without them (the files need not exist any more), but not τ* (no :meth:`use_alpha`).
    """

    _NOT_HYPERPARAMETERS = ("factors",)

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
        alpha_search: Literal["grid", "golden"] = "grid",
        proxy_images: int = 32,
        merge_device: str | None = None,
        templates: str = "auto",
        classnames: list[str] | None = None,
        head_cache: bool = True,
        factors: FactorCache | None = None,
        allow_target_experts: bool = False,
        qkv: QKVConvention = "fused",
        backbone: str = "open_clip",
        backbone_options: dict[str, Any] | None = None,
    ) -> None:
        resolved = check_arguments(mode, alpha, alpha_search, method, dict(method_options or {}))
        check_count(mode, len(task_vectors or []))
        check_convention(method, bool(resolved and resolved.statistics), get_backbone(backbone).convention, qkv)
        self.qkv = qkv
        self.method = method
        self.method_options = dict(method_options or {})
        #: The method, resolved once, here: registration, options (defaults filled), statistics (None: not "merge").
        self.resolved_method = resolved  # an inputs.ResolvedMethod
        super().__init__(model_name, pretrained, templates, classnames, head_cache, backbone, backbone_options)
        self.mode = mode
        self.alpha = alpha
        self.alpha_grid = list(alpha_grid or DEFAULT_ALPHA_GRID)
        self.alpha_search = alpha_search
        self.proxy_images = proxy_images
        self.merge_device = merge_device
        self.factors = factors
        self.allow_target_experts = allow_target_experts
        #: Where :meth:`save_merged` will write (``lightning-score merge`` sets it): checked writable in setup, first.
        self.merged_output: Path | None = None
        self.not_held_out: list[str] = []  #: Test domains an expert was fine-tuned on (``allow_target_experts``).
        self.task_vector_paths = [Path(p) for p in task_vectors or []]
        self._read: MergeInputs | None = None  # the task vectors and θ₀, read in setup
        self.experts = nn.ModuleList()
        self.merged: TaskVector | None = None  #: τ* at α = 1 (mode ``merge``), on CPU, in the backbone's keys.
        self.current_alpha: float | None = None  #: The α of the weights now in the image encoder.
        self.merge_seconds: float | None = None  #: Wall time of the merge (including a data method's statistics).
        self.merge_peak_bytes: int | None = None  #: Memory growth during the merge on the merge device.
        #: What the α search evaluated and chose (``alpha="auto"`` or :meth:`choose_alpha`), else None.
        self.alpha_search_result: AlphaSearchResult | None = None
        self._merge_record: dict[str, Any] | None = None  # the merge's provenance, kept when τ* is not
        self._prepared = False

    def _inputs(self) -> MergeInputs:
        if self._read is None:
            raise RuntimeError(
                "MergeModule has not read its task vectors yet: run it through a Trainer (trainer.test / validate / "
                "predict) or call setup() first. A module restored with load_from_checkpoint never reads them."
            )
        return self._read

    # --- setup: build the weights once ------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        """Read the task vectors, build the head (see :class:`CLIPClassifier`), then the mode's weights, once.

        A prepared module (set up before, or restored from a checkpoint) only checks its head.
        """
        trainer = self._trainer
        if trainer is not None:
            check_strategy(trainer.strategy, "MergeModule")
        if not self._prepared:  # everything that can fail is checked before the head is built and the merge runs
            if self.merged_output is not None:  # written by rank zero: checked there, every rank stops with it
                check = partial(ensure_writable, self.merged_output, what="The merged weights file")
                on_rank_zero(trainer.strategy, check) if trainer is not None else check()
            if self._read is None:
                paths, encoder = self.task_vector_paths, self.image_encoder
                self._read = read_inputs(paths, self.mode, encoder, self.base_model, self.pretrained_fingerprint)
            if self.mode == "merge" and self.alpha == "auto":  # no validation images: refused before the merge
                validation_loaders(self._datamodule())
        if self._read is not None:  # on every test: this datamodule's test domains
            tvs, allow = self._read.task_vectors, self.allow_target_experts
            self.not_held_out = held_out(tvs, self.mode, stage, self._datamodule(), allow)
        super().setup(stage)
        if self._prepared:
            return
        inputs = self._inputs()
        ready_for_passes(self, self._trainer)
        if self.mode == "expert":
            self._load_encoder(inputs.task_vectors[0].apply_to(inputs.pretrained, alpha=self._numeric_alpha()))
        elif self.mode == "ensemble":
            alpha = self._numeric_alpha()
            self.experts = expert_encoders(self.image_encoder, inputs.task_vectors, inputs.pretrained, alpha)
        elif self.mode == "merge":
            self.merged = self.merge()
            if self.alpha == "auto":
                self.choose_alpha()
            else:
                self.use_alpha(float(self.alpha))
        self._prepared = True

    @override
    def _test_domains(self, count: int) -> list[str]:
        return [f"{d}{NOT_HELD_OUT}" if d in self.not_held_out else d for d in super()._test_domains(count)]

    def _numeric_alpha(self) -> float:
        if self.alpha == "auto":
            raise ValueError(f"alpha='auto' applies to mode='merge' only, not mode='{self.mode}'.")
        return float(self.alpha)

    def _compute_device(self) -> torch.device:
        if self.merge_device is not None:
            return torch.device(self.merge_device)
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _load_encoder(self, state: Mapping[str, Tensor]) -> None:  # each rank its shard, once FSDP sharded it
        load_submodule_state(self._trainer.strategy if self._trainer else None, self, self.image_encoder, state)

    # --- the merge ---------------------------------------------------------------------------------

    def merge(self) -> TaskVector:
        """Merge the task vectors (at α = 1) on the compute device, once for all ranks.

        Shardable methods: each of the Trainer's ranks merges a share of the keys and the shares are
        exchanged. Others (and the data-using ones: ESM, RegMean, Fisher): rank zero collects the statistics
        (:meth:`collect_statistics`), merges and broadcasts τ*. A failure on any rank stops every rank.

        Returns:
            τ* on CPU. :attr:`merge_seconds` and :attr:`merge_peak_bytes` record the cost.
        """
        if self.resolved_method is None:
            raise ValueError(f"merge applies to mode='merge', not mode='{self.mode}'.")
        convention, read = self.backbone.convention, self._inputs().task_vectors
        task_vectors = to_matrices(read, convention, self.qkv)
        device = self._compute_device()
        strategy = self._trainer.strategy if self._trainer is not None else None
        with Measure(device) as measure:
            merged = merge_on_ranks(
                task_vectors,
                self.resolved_method.method,
                self.resolved_method.options,
                device,
                strategy,
                self.collect_statistics,
                factors=self.factors,
            )
        merged = from_matrices(merged, convention, self.qkv, read)
        self.merge_seconds, self.merge_peak_bytes = measure.seconds, measure.peak_bytes
        self._merge_record = merged.metadata.get("merge", {})
        statistics = (self.resolved_method.statistics, self.proxy_images)
        rank_zero_info(
            records.merge_summary(self.method, len(task_vectors), self._merge_record, statistics, device, measure)
        )
        return merged

    def merged_weights(self, alpha: float) -> dict[str, Tensor]:
        """θ₀ + α·τ* for the image encoder (keys the method exempts from α get τ* as it is), in θ₀'s dtype."""
        if self.merged is None:
            raise RuntimeError(
                "MergeModule has no merge yet: run it through a Trainer (trainer.test / validate / predict) or call "
                "setup() first. A module restored with load_from_checkpoint keeps its merged weights but not τ*."
            )
        exempt = self.merged.metadata.get("merge", {}).get("alpha_exempt_keys", [])
        return self.merged.apply_to(self._inputs().pretrained, alpha=alpha, exempt=exempt)  # type: ignore[return-value]

    def use_alpha(self, alpha: float) -> None:
        """Load θ₀ + α·τ* into the image encoder, from the merge already computed (nothing is merged again).

        A study evaluates α = 1 and the tuned α of one merge this way:
        ``trainer.test(module, dm)``, then ``module.use_alpha(a)`` and ``trainer.test(module, dm)`` again.

        Args:
            alpha: The scaling coefficient.

        Raises:
            ValueError: Not ``mode="merge"``.
            RuntimeError: No merge yet (see :meth:`merged_weights`).
        """
        if self.mode != "merge":
            raise ValueError(f"use_alpha applies to mode='merge', not mode='{self.mode}'.")
        self._load_encoder(self.merged_weights(float(alpha)))
        self.current_alpha = float(alpha)

    # --- α on the source domains' validation data ---------------------------------------------------

    def choose_alpha(self) -> float:
        """Choose α by top-1 accuracy on the source domains' validation data; load it; return it.

        ``alpha_search="grid"`` evaluates every value of :attr:`alpha_grid`; ``"golden"`` runs a
        golden-section search on [0, 2] (see :mod:`lightning_score.merge_module.alpha`). Every evaluation runs in eval
        and inference mode under the Trainer's precision, each rank on its share of the validation data.
        The search is kept as :attr:`alpha_search_result`. No validation images for a source domain: a ValueError.
        """
        loaders, domains = validation_loaders(self._datamodule())
        device = self._compute_device()
        assert self.head is not None

        def accuracy(alpha: float) -> float:
            self.use_alpha(alpha)
            return validation_accuracy(self.image_encoder, self.head, loaders, self._trainer, device, domains)

        result = search_alpha(accuracy, self.alpha_search, self.alpha_grid)
        self.alpha_search_result = result
        self.use_alpha(result.selected)
        rank_zero_info(f"MergeModule: {result.summary()}")
        warning = result.edge_warning()
        if warning is not None:
            rank_zero_warn(f"MergeModule: {warning}")
        return result.selected

    # --- the data-using methods' statistics -------------------------------------------------------

    def collect_statistics(self, device: torch.device | None = None) -> dict[str, list[dict[str, Tensor]]]:
        """Run each expert θ₀ + τ_t on :attr:`proxy_images` unlabelled images of its own (source) domain.

        Collects what :attr:`method` takes (ESM: ``activations``, RegMean: ``grams``, Fisher: ``fishers``;
        see :mod:`lightning_score.merge_module.statistics`), in eval mode under the Trainer's precision. Never reads
        a test (target) domain.

        Args:
            device: Where the experts run; default the merge device.

        Returns:
            Option name → one mapping per task vector (CPU tensors); empty for a data-free method.
        """
        inputs = self._inputs()
        return collect_statistics(
            self.method,
            self.resolved_method.statistics if self.resolved_method else (),
            inputs.task_vectors,
            self.image_encoder,
            inputs.pretrained,
            self.head,
            self._datamodule(),
            num_images=self.proxy_images,
            trainer=self._trainer,
            device=device or self._compute_device(),
        )

    # --- test ------------------------------------------------------------------------------------------

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Logits of the merged (or zero-shot, or expert) model; in ``ensemble`` mode the experts' mean logits."""
        if self.mode != "ensemble" or len(self.experts) == 0:
            return super().forward(images)
        return ensemble_logits(self.experts, self.head, images)  # type: ignore[arg-type]  # built in setup

    @override
    def on_test_epoch_end(self) -> None:
        """Log the per-domain metrics, and α when it was searched."""
        super().on_test_epoch_end()
        if self.alpha_search_result is not None and self.current_alpha is not None:
            self.log("alpha", self.current_alpha, sync_dist=False)

    # --- checkpoints and output ---------------------------------------------------------------------

    def _record(self) -> records.PreparedRecord:
        return records.PreparedRecord(
            self.mode, self.current_alpha, self.alpha_search_result, self._merge_record, len(self.experts)
        )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the prepared state (mode, α, the merge's provenance) next to the merged weights."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[records.CHECKPOINT_KEY] = self._record().checkpoint_entry(self._prepared)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's prepared weights as they are: ``setup`` neither reads task vectors nor merges."""
        super().on_load_checkpoint(checkpoint)
        record = records.PreparedRecord.from_checkpoint(checkpoint, self.mode)
        if record is None:
            return
        if self.mode == "ensemble" and len(self.experts) != record.experts:
            self.experts = nn.ModuleList(copy.deepcopy(self.image_encoder) for _ in range(record.experts))
        self.current_alpha, self._merge_record = record.current_alpha, record.merge
        self.alpha_search_result = record.alpha_search
        self.merged = None  # the weights are the checkpoint's; a τ* computed here would not describe them
        self._prepared = True

    def save_merged(self, path: str | Path) -> Path:
        """Write the merged open_clip CLIP as a ``pretrained=path`` weights file (:func:`.outputs.save_merged`)."""
        return outputs.save_merged(self, path)

    def export(
        self, directory: str | Path, *, overwrite: bool = False, test_accuracies: Mapping[str, float] | None = None
    ) -> Path:
        """Write the merged model in its library's own format, with a card (:func:`.outputs.export_merged`)."""
        return outputs.export_merged(self, directory, overwrite=overwrite, test_accuracies=test_accuracies)
