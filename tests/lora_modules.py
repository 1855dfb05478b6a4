"""A LightningModule holding a PEFT-LoRA model, as people write one, for the callback's LoRA tests and scripts."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import peft
import torch
from torch import nn

__all__ = ["LORA_KEYS", "LoraRegressor", "Net", "lora_update"]

LORA_KEYS = ["net.attn.in_proj_weight", "net.attn.out_proj.weight", "net.fc1.weight", "net.fc2.bias", "net.fc2.weight"]
"""The task-vector keys of a fitted :class:`LoraRegressor`: the weights its adapters and its saved fc2 change."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))[:, None]
        return self.fc2(self.attn(h, h, h)[0][:, 0])


class LoraRegressor(pl.LightningModule):
    """A Trainer's module as people write it: a PEFT model inside, adapters trainable, the base frozen."""

    def __init__(self, net: nn.Module, lora: bool = True, encoder_attr: bool = False) -> None:
        super().__init__()
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "attn"], modules_to_save=["fc2"])
        self.net = peft.get_peft_model(net, config) if lora else net
        if encoder_attr:
            self.image_encoder = self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def lora_update(module: LoraRegressor, base: nn.Module) -> dict[str, torch.Tensor]:
    """merge_and_unload()'s weights minus the base weights, per base key (prefixed as in the LightningModule)."""
    merged = copy.deepcopy(module.net).merge_and_unload().state_dict()
    return {f"net.{key}": merged[key].double() - value.double() for key, value in base.state_dict().items()}
