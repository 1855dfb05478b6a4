"""The shared evaluation model: an open_clip image encoder under a frozen zero-shot head.

:class:`CLIPClassifier` builds the CLIP model (``model_name`` + ``pretrained``), builds the zero-shot head
from the datamodule's class names in ``setup``, and validates/tests with torchmetrics: top-1 and balanced
accuracy, one test dataloader per domain, logged as ``test/<domain>/acc`` and ``test/<domain>/balanced_acc``.
:class:`~lightning_score.expert.CLIPExpert` adds training; a merge module adds weight merging in ``setup``
and reuses the test loop unchanged.

Override points, in the order Lightning meets them: :meth:`CLIPClassifier.configure_clip` (``__init__``:
the model and transforms), :meth:`CLIPClassifier.setup` (head; call ``super().setup(stage)`` first), and
:meth:`CLIPClassifier.build_head`.

What it reads from the datamodule is stated by :mod:`lightning_score.data.protocols`: the class names
(:class:`~lightning_score.data.ClassNames`, unless ``classnames=`` is given), the test domains' names
(:class:`~lightning_score.data.TestDomains`) and, from a :class:`~lightning_score.data.DomainNames`, its own
template set and its domains. A datamodule without them gets the defaults: the ``imagenet`` templates, test
dataloaders named ``domain0``, ``domain1``...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from typing_extensions import override

from lightning_score.data.protocols import ClassNames, DomainNames, TestDomains
from lightning_score.models import build_zero_shot_head, guess_template_set, load_templates
from lightning_score.models.backbones import get_backbone
from lightning_score.models.sharding import ShardedBlocks
from lightning_score.models.templates import templates_naming_domains
from lightning_score.models.zero_shot import ZeroShotHead, fixed_zero_shot_head
from lightning_score.task_vector import state_dict_fingerprint
from lightning_score.utilities.metrics import BalancedAccuracy, accuracy_metrics, balanced_accuracy, per_class_counts

__all__ = ["BalancedAccuracy", "CLIPClassifier", "balanced_accuracy", "per_class_counts"]

log = logging.getLogger(__name__)

_CHECKPOINT_KEY = "lightning_score"


class CLIPClassifier(ShardedBlocks, LightningModule):
    """A CLIP image encoder with a frozen zero-shot head, evaluated per domain.

    Nothing trains here (every parameter is frozen); see :class:`~lightning_score.expert.CLIPExpert`.

    Attributes:
        image_encoder: The open_clip image tower (``model.visual``): what experts fine-tune and task vectors
            describe (keys such as ``conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ``proj``).
        clip: The whole open_clip model (text tower frozen, used to build the head).
        head: The :class:`~lightning_score.models.ZeroShotHead`, built in ``setup`` (or ``__init__`` when
            ``classnames`` is given).
        train_transform: open_clip's training preprocessing (the datamodule takes it).
        val_transform: open_clip's evaluation preprocessing.
        base_model: The pre-trained model's label, e.g. ``"ViT-B-32/openai"``.
        pretrained_fingerprint: ``state_dict_fingerprint`` of the pre-trained image encoder.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-B-32"``, or a tiny CPU one, ``"tiny-ViT-W96-L3"``.
        pretrained: ``"openai"`` (or another open_clip tag), a local ``.safetensors``/``.pt`` file,
            ``"builtin:digits"`` (the offline base), or ``None`` (random).
        templates: Prompt-template set for the head (``"imagenet"``, ``"pacs"``, ``"digits"``,
            ``"medical_retina"``, ... or a ``.json`` path), or ``"auto"``: the datamodule's own set, else one
            matching its domain names, else ``"imagenet"``.
        classnames: Class names for the head; default: the datamodule's ``classnames``.
        head_cache: Read/write zero-shot heads from/to the disk cache.
        backbone: The library holding the CLIP model (:mod:`lightning_score.models.backbones`): ``"open_clip"``
            (the default), ``"hf"`` (transformers' ``CLIPModel``: ``model_name`` a ``save_pretrained`` folder or a
            hub id) or ``"timm"`` (a timm CLIP ViT: ``model_name`` its architecture, ``pretrained`` a weights file,
            the head from ``backbone_options.text`` or ``backbone_options.head``). ``builtin:digits`` works for
            each (a copy of the offline base in that library's format).
        backbone_options: The backbone's own settings (timm: ``model_args``, ``text``, ``head``).
    """

    #: Constructor arguments kept out of ``hparams`` (and so out of checkpoints): objects, not settings.
    _NOT_HYPERPARAMETERS: tuple[str, ...] = ()

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        templates: str = "auto",
        classnames: list[str] | None = None,
        head_cache: bool = True,
        backbone: str = "open_clip",
        backbone_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self._NOT_HYPERPARAMETERS))
        self.model_name = model_name
        self.pretrained = pretrained
        self.backbone = get_backbone(backbone)
        self.backbone_options = self.backbone.check_options(backbone_options)
        self.templates = templates
        self.head_cache = head_cache
        self.head: ZeroShotHead | None = None
        self.template_set: str | None = None
        self.configure_clip()
        self.val_metrics: MetricCollection | None = None
        self.test_metrics = nn.ModuleDict()
        self.test_domain_names: list[str] = []
        if classnames is not None:
            self.build_head(classnames)

    # --- building ------------------------------------------------------------------------------

    def configure_clip(self) -> None:
        """Build the backbone's model and transforms from ``model_name`` and ``pretrained``; freeze everything.

        Sets :attr:`clip`, :attr:`train_transform`, :attr:`val_transform`, :attr:`tokenizer`, :attr:`base_model`
        and :attr:`pretrained_fingerprint`. Subclasses that change the model extend this.
        """
        components = self.backbone.build(self.model_name, self.pretrained, self.backbone_options)
        self.clip = components.model.train()
        self.clip.requires_grad_(False)
        self.train_transform = components.train_transform
        self.val_transform = components.val_transform
        self.tokenizer = components.tokenizer
        self.base_model = components.base_model
        self.pretrained_fingerprint = state_dict_fingerprint(self.image_encoder.state_dict())

    @property
    def image_encoder(self) -> nn.Module:
        """The open_clip image tower (``clip.visual``); its ``state_dict()`` keys are the task-vector keys."""
        return self.clip.visual

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _domain_names(self) -> DomainNames | None:
        datamodule = self._datamodule()
        return datamodule if isinstance(datamodule, DomainNames) else None

    def resolve_templates(self) -> str:
        """The template set to use: ``templates`` unless it is ``"auto"`` (see the class docstring)."""
        if self.templates != "auto":
            return self.templates
        datamodule = self._domain_names()
        if datamodule is not None:
            own = datamodule.default_templates
            if own:
                return own
            domains = datamodule.domains
            guessed = guess_template_set(list(domains)) if domains else None
            if guessed:
                return guessed
        return "imagenet"

    def build_head(self, classnames: Sequence[str], template_set: str | None = None) -> ZeroShotHead:
        """Build the frozen zero-shot head for ``classnames`` (read from the disk cache when possible).

        The text tower encodes on the Trainer's device when one is attached.

        Args:
            classnames: Class names in label order.
            template_set: A template set's name or ``.json`` path; default :meth:`resolve_templates`.

        Returns:
            The head, also stored as :attr:`head`.
        """
        name = template_set or self.resolve_templates()
        templates = load_templates(name)
        self._warn_if_templates_name_held_out_domains(name, templates)
        trainer = self._trainer
        fixed = getattr(self.clip, "fixed_head", None)  # a backbone without a text tower (timm with a head file)
        if fixed is not None:
            head = fixed_zero_shot_head(fixed, classnames)
        else:
            if trainer is not None:
                self.clip.to(trainer.strategy.root_device)
            head = build_zero_shot_head(self.clip, self.tokenizer, classnames, templates, cache=self.head_cache)
        self.head = head.to(self.device)
        self.template_set = name
        if fixed is None:
            rank_zero_info(f"Zero-shot head: {len(classnames)} classes x {len(templates)} '{name}' templates.")
        return self.head

    def _warn_if_templates_name_held_out_domains(self, name: str, templates: Sequence[str]) -> None:
        """Warn when prompts describe a held-out (test-only) domain: the head would know the target's style.

        The datamodule's own default set is exempt: the paper's sets use words such as "photo" or "painting"
        that are also domain names, on purpose.
        """
        datamodule = self._domain_names()
        if datamodule is None or name == datamodule.default_templates:
            return
        train = set(datamodule.train_domains or [])
        held = [d for d in datamodule.test_domains or [] if d not in train]
        named = templates_naming_domains(templates, held)
        if named:
            example, domains = next(iter(named.items()))
            names = sorted({d for hits in named.values() for d in hits})
            rank_zero_warn(
                f"Template set '{name}' names the held-out domain(s) {names} in {len(named)} prompt(s), e.g. "
                f"{example!r} ({', '.join(domains)}): the zero-shot head then describes the target's style. "
                "templates='auto' gives the authors' set for a known dataset."
            )

    @override
    def setup(self, stage: str) -> None:
        """Build the zero-shot head from the datamodule's class names (unless it exists and they agree)."""
        datamodule = self._datamodule()
        classnames = datamodule.classnames if isinstance(datamodule, ClassNames) else None
        if classnames is None:
            if self.head is None:
                raise ValueError(
                    "CLIPClassifier needs class names for its zero-shot head: pass classnames=[...] or use a "
                    "datamodule with a `classnames` property (such as DomainDataModule)."
                )
            return
        if self.head is None:
            self.build_head(classnames)
        elif list(self.head.classnames) != list(classnames):
            raise ValueError(
                f"The head was built for classes {self.head.classnames[:5]}... but the datamodule has "
                f"{list(classnames)[:5]}...: their class lists (and order) must agree."
            )

    # --- inference -----------------------------------------------------------------------------

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Logits: L2-normalised image features times the head (``logit_scale · cos``)."""
        if self.head is None:
            raise RuntimeError(
                "The zero-shot head is not built yet: call build_head(classnames), pass classnames=..., or run "
                "through a Trainer with a datamodule (the head is built in setup)."
            )
        features = F.normalize(self.image_encoder(images), dim=-1)
        return self.head(features)

    def _num_classes(self) -> int:
        assert self.head is not None
        return self.head.num_classes

    @override
    def on_validation_epoch_start(self) -> None:
        """Create the validation metrics for this Trainer's processes."""
        self.val_metrics = accuracy_metrics(self._num_classes(), self.trainer.world_size > 1).to(self.device)

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Update ``val/acc`` and ``val/balanced_acc``; log ``val/loss``."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        assert self.val_metrics is not None
        self.val_metrics.update(logits, labels)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(labels), add_dataloader_idx=False, sync_dist=True)
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc`` and ``val/balanced_acc`` over the whole validation set."""
        if self.val_metrics is None or not all(m.update_called for m in self.val_metrics.values()):
            return
        for name, value in self.val_metrics.compute().items():
            self.log(f"val/{name}", value, prog_bar=name == "acc", sync_dist=True)
        self.val_metrics.reset()

    def _test_domains(self, count: int) -> list[str]:
        datamodule = self._datamodule()
        names = list((datamodule.test_domains if isinstance(datamodule, TestDomains) else None) or [])
        return names if len(names) == count else [f"domain{i}" for i in range(count)]

    @override
    def on_test_epoch_start(self) -> None:
        """Name the test dataloaders after the datamodule's ``test_domains`` and create fresh metrics for each."""
        counts = self.trainer.num_test_batches
        self.test_domain_names = self._test_domains(len(counts))
        sync = self.trainer.world_size > 1
        self.test_metrics = nn.ModuleDict(
            {str(i): accuracy_metrics(self._num_classes(), sync) for i in range(len(counts))}
        ).to(self.device)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the metrics of this batch's domain (one dataloader per domain)."""
        images, labels = batch
        self.test_metrics[str(dataloader_idx)].update(self(images), labels)

    @override
    def on_test_epoch_end(self) -> None:
        """Log ``test/<domain>/acc`` and ``test/<domain>/balanced_acc`` for every test domain."""
        for index, domain in enumerate(self.test_domain_names):
            metrics = self.test_metrics[str(index)]
            for name, value in metrics.compute().items():
                self.log(f"test/{domain}/{name}", value, add_dataloader_idx=False, sync_dist=True)
            metrics.reset()

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities and predictions (and the labels, when the batch has them)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        probs = self(images).softmax(dim=-1)
        out = {"probs": probs, "preds": probs.argmax(dim=-1)}
        if isinstance(batch, list | tuple) and len(batch) > 1:
            out["labels"] = batch[1]
        return out

    # --- checkpoints ---------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the base model, its fingerprint and the head's classes and templates."""
        checkpoint[_CHECKPOINT_KEY] = {
            "base_model": self.base_model,
            "pretrained_fingerprint": self.pretrained_fingerprint,
            "classnames": self.head.classnames if self.head is not None else None,
            "templates": self.head.templates if self.head is not None else None,
            "template_set": self.template_set,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Recreate the head from the checkpoint so ``load_from_checkpoint`` works without a datamodule."""
        record = checkpoint.get(_CHECKPOINT_KEY) or {}
        weight = checkpoint.get("state_dict", {}).get("head.weight")
        if self.head is None and weight is not None and record.get("classnames"):
            self.head = ZeroShotHead(weight, record["classnames"], record.get("templates") or [])
            self.template_set = record.get("template_set")
