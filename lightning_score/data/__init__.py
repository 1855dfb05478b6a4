"""Domain data: the DomainBed-layout :class:`DomainDataModule` and the built-in rotated-digits benchmark.

``lightning_score.data.digits`` (imported on demand) materialises the offline benchmark and pre-trains
its tiny base CLIP.
"""

from __future__ import annotations

from lightning_score.data.domain_datamodule import DomainDataModule, DomainSplit, ImageListDataset

__all__ = ["DomainDataModule", "DomainSplit", "ImageListDataset"]
