"""LoRA experts: PEFT's LoRA layers injected into the open_clip image encoder, the base weights frozen.

:class:`LoraSettings` says how (rank, α, the layers adapted, dropout, rsLoRA); :func:`add_lora` injects the
adapters in place with ``peft.inject_adapter_in_model``, so the encoder keeps its own type and attributes and a
LoRA expert's task vector (read by :mod:`lightning_score.callback.adapters`) has the keys of a full fine-tune's.
PEFT is an optional extra: :func:`require_peft` names it when it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import ModuleType
from typing import Any

from torch import nn

from lightning_score.utilities.extras import require

__all__ = ["DEFAULT_TARGETS", "LoraSettings", "add_lora", "require_peft"]

DEFAULT_TARGETS: tuple[str, ...] = ("attn", "mlp.c_fc", "mlp.c_proj")
"""Every linear layer of the image tower's blocks: the attention (``nn.MultiheadAttention``: ``in_proj_weight`` and
``out_proj``) and the MLP."""


def require_peft() -> ModuleType:
    """The ``peft`` module.

    Raises:
        MissingExtraError: PEFT is not installed (one line naming the ``peft`` extra).
    """
    return require("peft", extra="peft")


@dataclass(frozen=True)
class LoraSettings:
    """How a LoRA expert adapts the image encoder (PEFT's ``LoraConfig``); only the adapters train.

    Attributes:
        rank: The rank ρ of each update ``ΔW = s·B·A`` (``r``).
        alpha: ``lora_alpha``: the scale is ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA); ``None``:
            the rank (``s = 1``).
        targets: The adapted layers, as PEFT's ``target_modules`` (names or name suffixes inside the image
            encoder); default: the attention and MLP linear layers of every block.
        dropout: ``lora_dropout`` on the adapters' input (Linear layers; PEFT's MultiheadAttention adds its update
            to the weights and has none).
        use_rslora: Rank-stabilised LoRA: ``s = alpha / sqrt(rank)``.
    """

    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive (or null: the rank), got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"lora.targets must name at least one layer, got {list(self.targets)!r}.")

    @classmethod
    def of(cls, value: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
        """``value`` as settings: a mapping's keys are the attributes' names (checked, with one message)."""
        if value is None or isinstance(value, LoraSettings):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"lora: give LoraSettings, a mapping of its settings or None; got {type(value).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"lora: unknown setting(s) {unknown}; the settings are {names}.")
        return cls(**value)

    @property
    def scale(self) -> float:
        """The update's scale ``s``, as PEFT computes it."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / self.rank**0.5 if self.use_rslora else alpha / self.rank

    def record(self) -> dict[str, Any]:
        """The settings as plain values (hyperparameters, checkpoints, study records)."""
        return {**asdict(self), "targets": list(self.targets)}


def add_lora(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place; afterwards only the adapters require grad.

    The adapters start at ``B = 0`` (PEFT's default), so the module computes exactly as before.

    Raises:
        MissingExtraError: PEFT is not installed (the message names the extra).
        ValueError: ``settings.targets`` match no layer of ``module`` (the message lists its block layers).
    """
    peft = require_peft()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.rank if settings.alpha is None else settings.alpha,
        target_modules=list(settings.targets),
        lora_dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        bias="none",
    )
    try:
        return peft.inject_adapter_in_model(config, module)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        raise ValueError(
            f"lora.targets {list(settings.targets)} match no layer of the image encoder; its first block's layers "
            f"are {_block_layers(module)} (PEFT matches a name or a name's last parts)."
        ) from None


def _block_layers(module: nn.Module) -> list[str]:
    """The names PEFT can adapt in the first block of an open_clip tower (inside ``resblocks.0``)."""
    attention = [name for name, sub in module.named_modules() if isinstance(sub, nn.MultiheadAttention)]
    return [
        name.split("resblocks.0.", 1)[1]
        for name, sub in module.named_modules()
        if "resblocks.0." in name
        and isinstance(sub, nn.Linear | nn.MultiheadAttention)
        and not any(name.startswith(f"{owner}.") for owner in attention)  # out_proj: adapted with its attention
    ]
