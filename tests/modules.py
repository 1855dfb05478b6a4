"""Small LightningModules that are not CLIPExpert, shared by the callback tests and the multi-process scripts."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Regressor(pl.LightningModule):
    """A frozen "backbone" and a trainable head, plus an integer buffer.

    Args:
        encoder_attr: Expose the head as ``image_encoder`` (and its initial ``pretrained_fingerprint``), as
            CLIPExpert does.
        width: Width of the head's hidden layer (a wide one makes θ₀ large enough to see in a checkpoint).
        seed: Initialisation seed.
        lr: SGD learning rate.
    """

    def __init__(self, encoder_attr: bool = False, width: int = 6, seed: int = 0, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(4, 8)
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.lr = lr
        if encoder_attr:
            from lightning_score.task_vector import state_dict_fingerprint

            self.image_encoder = self.head
            self.pretrained_fingerprint = state_dict_fingerprint(self.head.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen += 1
        return nn.functional.mse_loss(self(x), y)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class LazyRegressor(Regressor):
    """The head's first layer is an ``nn.LazyLinear``: its weights exist only after the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head[0] = nn.LazyLinear(6)


class CompiledRegressor(Regressor):
    """The head is wrapped by ``torch.compile`` (state-dict keys gain ``_orig_mod.``)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.head = torch.compile(self.head, backend="eager")


def data(n: int = 64, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)


def trainer(root: Path, callbacks: list, **kwargs: object) -> pl.Trainer:
    """A quiet CPU Trainer of 6 steps (override anything with keyword arguments)."""
    options: dict = dict(default_root_dir=root, max_steps=6, accelerator="cpu", devices=1, **QUIET)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def head_state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The head's weights, cloned, with keys as a task vector names them (``head.0.weight``...)."""
    return {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in module.state_dict().items() if "head" in k}


class RegressionData(pl.LightningDataModule):
    """A user's own datamodule (the CLI takes any ``class_path``): the regression data of :func:`data`."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return data(batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return data(batch_size=self.batch_size)


class FailingRegressor(Regressor):
    """Fails in its third training step, as a bug in user code would."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 2:
            raise ValueError("a bug in training_step")
        return super().training_step(batch, batch_idx)
