"""Domain data: the :class:`DomainDataModule`, the dataset presets of the SCORE paper, and the built-in benchmark.

The data flow: ``layouts``/``lists`` read a dataset folder and split each domain as the SCORE authors do
(``splits``), ``presets`` know each benchmark (domains, prompts, epochs, SCORE options), and
``domain_datamodule`` serves the splits to Lightning. ``lightning_score.data.digits`` (imported on demand)
materialises the offline benchmark and pre-trains its tiny base CLIP.
"""

from __future__ import annotations

from lightning_score.data.domain_datamodule import DomainDataModule, DomainSplit, ImageListDataset
from lightning_score.data.index import DatasetIndex, DomainSamples
from lightning_score.data.layouts import detect_layout, read_dataset
from lightning_score.data.presets import DatasetPreset, detect_preset, get_preset, list_presets

__all__ = [
    "DatasetIndex",
    "DatasetPreset",
    "DomainDataModule",
    "DomainSamples",
    "DomainSplit",
    "ImageListDataset",
    "detect_layout",
    "detect_preset",
    "get_preset",
    "list_presets",
    "read_dataset",
]
