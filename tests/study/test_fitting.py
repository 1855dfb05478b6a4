"""fit_task_vector: one seeded CLIPExpert fit of the study's config, its task vector written with its settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.data import DomainDataModule
from lightning_score.study import ExpertSettings, StudyConfig
from lightning_score.study.fitting import FitResult, fit_task_vector
from lightning_score.study.stages import Fit
from tests.experts import QUICK_BASE
from tests.study.conftest import DOMAINS

TINY = ExpertSettings(lr=1e-3, warmup_steps=1, max_steps=2, max_epochs=None, batch_size=8)
RECORD = {"kind": "expert", "expert": dataclasses.asdict(TINY), "seed": 0}


def _config(tmp_path: Path, base: Path, root: Path, **overrides: object) -> StudyConfig:
    """A resolved study config (what ``Study.config`` holds): the quick base, two steps, every mini domain."""
    settings = dict(output_dir=str(tmp_path), model_name=QUICK_BASE["model_name"], pretrained=str(base),
                    templates="digits", root=str(root), domains=DOMAINS, expert=TINY, accelerator="cpu",
                    seeds=[0])  # fmt: skip
    settings.update(overrides)
    return StudyConfig(**settings)


def _data(root: Path, seen: list[tuple[list[str], int]] | None = None):
    def make(domains: list[str], batch_size: int) -> DomainDataModule:
        if seen is not None:
            seen.append((domains, batch_size))
        return DomainDataModule(str(root), train_domains=domains, batch_size=batch_size, num_workers=0)

    return make


def test_a_fit_writes_its_task_vector_with_the_settings_a_rerun_compares(
    tmp_path: Path, quick_base: Path, mini_digits: Path
) -> None:
    config = _config(tmp_path / "study", quick_base, mini_digits)
    seen: list[tuple[list[str], int]] = []
    path = tmp_path / "first" / "rot30.safetensors"
    result = fit_task_vector(Fit("expert", 0, "rot30"), config, path, _data(mini_digits, seen), RECORD)
    assert isinstance(result, FitResult) and result.steps == 2 and result.train_domains == ["rot30"]
    assert result.seconds > 0 and seen == [(["rot30"], 8)]  # one process: the global batch as it is
    tv = TaskVector.load(path)
    assert tv.metadata["expert_config"] == RECORD  # what a rerun compares, in the task vector itself
    assert tv.metadata["name"] == "rot30" and tv.metadata["train_domains"] == ["rot30"]
    assert (tmp_path / "study" / "logs" / "seed-0" / "fits" / "rot30").is_dir()  # the training curve

    twin_config = dataclasses.replace(config, output_dir=str(tmp_path / "twin"))  # its own training curve
    again = fit_task_vector(Fit("expert", 0, "rot30"), twin_config, tmp_path / "again.safetensors", _data(mini_digits),
                            RECORD)  # fmt: skip
    twin = TaskVector.load(tmp_path / "again.safetensors")
    assert again.steps == 2 and sorted(twin) == sorted(tv)
    assert all(torch.equal(twin[key], tv[key]) for key in tv)  # the same seed: the same task vector, bit for bit
    other = fit_task_vector(Fit("expert", 1, "rot30"), config, tmp_path / "seed1.safetensors", _data(mini_digits),
                            RECORD)  # fmt: skip
    assert other.steps == 2
    seed1 = TaskVector.load(tmp_path / "seed1.safetensors")
    assert any(not torch.equal(seed1[key], tv[key]) for key in tv)  # another seed: another data order


def test_a_pooled_fit_trains_on_the_folds_sources(tmp_path: Path, quick_base: Path, mini_digits: Path) -> None:
    config = _config(tmp_path, quick_base, mini_digits)
    seen: list[tuple[list[str], int]] = []
    path = tmp_path / "pooled" / "rot30.safetensors"
    result = fit_task_vector(Fit("pooled", 0, "rot30"), config, path, _data(mini_digits, seen), RECORD)
    assert result.train_domains == ["rot0", "rot60"] and seen == [(["rot0", "rot60"], 8)]
    tv = TaskVector.load(path)
    assert tv.metadata["name"] == "pooled-rot30" and tv.metadata["train_domains"] == ["rot0", "rot60"]


class _StopError(Exception):
    """Raised by the data factory: the fit's arguments are seen, no process is launched."""


@pytest.mark.parametrize(("devices", "num_nodes", "per_process"), [(2, 1, 16), (2, 2, 8)])
def test_the_global_batch_is_divided_by_the_world_size(
    devices: int, num_nodes: int, per_process: int, tmp_path: Path, quick_base: Path, mini_digits: Path
) -> None:
    config = _config(tmp_path, quick_base, mini_digits, expert=dataclasses.replace(TINY, batch_size=32),
                     devices=devices, num_nodes=num_nodes)  # fmt: skip
    seen: list[tuple[list[str], int]] = []
    make = _data(mini_digits, seen)

    def stop(domains: list[str], batch_size: int) -> DomainDataModule:
        make(domains, batch_size)
        raise _StopError

    with pytest.raises(_StopError):
        fit_task_vector(Fit("expert", 0, "rot0"), config, tmp_path / "rot0.safetensors", stop, RECORD)
    assert seen == [(["rot0"], per_process)]  # expert.batch_size stays the global batch of the DDP fit
    assert not (tmp_path / "rot0.safetensors").exists()
