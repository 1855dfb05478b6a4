"""A CLIP domain expert: fine-tune the whole image encoder (or LoRA adapters in it) under the frozen zero-shot head.

The protocol's defaults: AdamW (lr 1e-5, weight decay 0.1) over the image encoder's parameters only,
cosine schedule with 500 warm-up steps, cross-entropy on ``logit_scale · cos(image, class prompt)``. The
text tower, the logit scale and the head never change, so the expert's task vector is exactly the
difference of ``image_encoder.state_dict()`` before and after fit.

Set on the Trainer (the recipes do): ``gradient_clip_val: 1.0``, ``precision: bf16-mixed`` (or
``16-mixed``), the number of epochs or steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_score.classifier import CLIPClassifier
from lightning_score.models.lora import LoraSettings, add_lora, require_peft
from lightning_score.models.schedule import warmup_cosine

__all__ = ["CLIPExpert"]


class CLIPExpert(CLIPClassifier):
    """Fine-tunes a CLIP image encoder on one domain with a frozen zero-shot head.

    Validation logs ``val/acc``, ``val/balanced_acc``, ``val/loss``; test logs ``test/<domain>/acc`` and
    ``test/<domain>/balanced_acc`` per test domain (see :class:`~lightning_score.classifier.CLIPClassifier`).
    The fine-tuned module is :attr:`image_encoder`.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-B-32"``, or ``"tiny-ViT-W96-L3"`` for CPU runs (for the
            ``hf`` and ``timm`` backbones, see ``backbone``).
        pretrained: ``"openai"`` (or another open_clip tag), a local ``.safetensors``/``.pt`` file,
            ``"builtin:digits"``, or ``None``.
        templates: Prompt-template set for the head, or ``"auto"``.
        classnames: Class names for the head; default: the datamodule's.
        head_cache: Read/write zero-shot heads from/to the disk cache.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (applied to every trained parameter).
        warmup_steps: Linear warm-up steps before the cosine decay to zero at the last step.
        gradient_checkpointing: Recompute the image encoder's activations in backward (less memory).
        compile_image_encoder: ``torch.compile`` the image encoder in place (its state-dict keys are unchanged).
        lora: Fine-tune a LoRA expert (needs ``pip install "lightning-score[peft]"``), e.g. ``--model.lora.rank 16``
            or ``lora: {rank: 16}``: PEFT's LoRA adapters in the image encoder, and only they train, under the same
            protocol. Settings (:class:`~lightning_score.models.lora.LoraSettings`): ``rank`` (16), ``alpha``
            (null: the rank), ``targets`` (``[attn, mlp.c_fc, mlp.c_proj]``: every block linear layer),
            ``dropout`` (0.0), ``use_rslora`` (false). Its task vector is the adapters' weight update, under the
            keys of a full fine-tune. ``None``: the whole image encoder trains. open_clip backbone only.
        backbone: ``"open_clip"``, ``"hf"`` or ``"timm"`` (see :class:`~lightning_score.classifier.CLIPClassifier`).
        backbone_options: The backbone's own settings (timm: ``model_args``, ``text``, ``head``).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        templates: str = "auto",
        classnames: list[str] | None = None,
        head_cache: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        gradient_checkpointing: bool = False,
        compile_image_encoder: bool = False,
        lora: LoraSettings | None = None,
        backbone: str = "open_clip",
        backbone_options: dict[str, Any] | None = None,
    ) -> None:
        lora_settings = LoraSettings.of(lora)
        if lora_settings is not None:
            if backbone != "open_clip":
                raise ValueError(
                    f"CLIPExpert(lora=...) fine-tunes open_clip models only, not backbone '{backbone}': its LoRA "
                    "targets name open_clip's layers. Fine-tune the whole image encoder (lora: null), or use the "
                    "open_clip backbone; ScoreMergeCallback itself snapshots PEFT adapters on any module."
                )
            require_peft()  # before the model is built: the missing extra in seconds
        lora = lora_settings.record() if lora_settings else None  # type: ignore[assignment]  # hparams: plain values
        super().__init__(
            model_name=model_name,
            pretrained=pretrained,
            templates=templates,
            classnames=classnames,
            head_cache=head_cache,
            backbone=backbone,
            backbone_options=backbone_options,
        )
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(
                f"Need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, {warmup_steps}."
            )
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_image_encoder = compile_image_encoder
        self._compiled = False
        self.lora = lora_settings
        self.image_encoder.requires_grad_(True)
        for name in self.backbone.fixed_parameters(self.image_encoder):  # timm's zero head bias: not CLIP's
            self.image_encoder.get_parameter(name).requires_grad_(False)
        if lora_settings is not None:
            add_lora(self.image_encoder, lora_settings)  # only the adapters train
        if gradient_checkpointing:
            self.backbone.set_grad_checkpointing(self.clip)

    @override
    def configure_model(self) -> None:
        """Shard per residual block under FSDP2 (:class:`.ShardedBlocks`), then compile if ``compile_image_encoder``."""
        super().configure_model()
        if self.compile_image_encoder and not self._compiled:
            self.image_encoder.compile()
            self._compiled = True

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the head's logits; logs ``train/loss`` and ``train/acc``."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", (logits.argmax(dim=-1) == labels).float().mean(), batch_size=len(labels))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        """AdamW over the image encoder's parameters, stepped by a per-step warm-up + cosine schedule."""
        params = [p for p in self.image_encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if self.warmup_steps >= total:
            rank_zero_warn(self._short_run_message(total))
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _short_run_message(self, total: int) -> str:
        """Why the schedule is longer than the data: the warm-up, the run's steps and where they come from."""
        trainer = self.trainer
        if trainer.max_steps >= 0 and trainer.max_steps == total:
            steps = f"max_steps={trainer.max_steps}"
        else:
            steps = f"{trainer.num_training_batches} batches an epoch × max_epochs={trainer.max_epochs}"
            if trainer.accumulate_grad_batches > 1:
                steps += f" / accumulate_grad_batches={trainer.accumulate_grad_batches}"
        return (
            f"CLIPExpert: the schedule is longer than the data: warmup_steps={self.warmup_steps} is not below the "
            f"run's {total} optimiser steps ({steps}), so the learning rate never leaves the warm-up and never "
            f"reaches lr={self.lr}. Lower warmup_steps (--model.init_args.warmup_steps), or train for more steps "
            "(--trainer.max_steps, --trainer.max_epochs) or with a smaller batch (--data.batch_size)."
        )
