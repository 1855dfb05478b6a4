"""Domain data: the :class:`DomainDataModule`, the dataset presets of the SCORE paper, and the built-in benchmark.

The data flow: ``layouts``/``split_files`` read a dataset folder into an ``index``, each domain split as the SCORE
authors do (``splits``); ``presets`` know each benchmark (domains, prompts, epochs, SCORE options);
``domain_datamodule`` serves the splits to Lightning; ``protocols`` states what the Lightning layer reads from a
datamodule. ``builtin`` is the registry of built-in benchmarks (``root="builtin:digits"``, whose data ``digits``
materialises).
"""

from __future__ import annotations

from lightning_score.data.domain_datamodule import DomainDataModule, DomainSplit, ImageListDataset
from lightning_score.data.index import DatasetIndex, DomainSamples
from lightning_score.data.layouts import detect_layout, read_dataset
from lightning_score.data.presets import DatasetPreset, detect_preset, get_preset, list_presets
from lightning_score.data.protocols import ClassNames, DomainNames, SourceDomains, TestDomains

__all__ = [
    "ClassNames",
    "DatasetIndex",
    "DatasetPreset",
    "DomainDataModule",
    "DomainNames",
    "DomainSamples",
    "DomainSplit",
    "ImageListDataset",
    "SourceDomains",
    "TestDomains",
    "detect_layout",
    "detect_preset",
    "get_preset",
    "list_presets",
    "read_dataset",
]
