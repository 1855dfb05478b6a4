"""merge_module.passes: the passes run as Lightning's evaluation does, flags restored; α's validation accuracy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_score.merge_module.passes import (
    gradient_pass,
    images_and_labels,
    inference_pass,
    ready_for_passes,
    validation_accuracy,
    validation_loaders,
)
from tests.experts import QUIET


def _model() -> nn.Module:
    """Submodules in mixed modes: the passes must hand every flag back as it was."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))
    model.train()
    model[1].eval()
    model[2][1].eval()
    return model


def _flags(model: nn.Module) -> list[bool]:
    return [sub.training for sub in model.modules()]


@pytest.mark.parametrize("gradients", [False, True])
def test_a_pass_runs_in_eval_mode_and_restores_every_flag(gradients: bool) -> None:
    model = _model()
    before = _flags(model)
    with inference_pass(model, None, gradients=gradients) as convert:
        assert not any(_flags(model))
        assert torch.is_inference_mode_enabled() is not gradients and torch.is_grad_enabled() is gradients
        images = torch.randn(5, 3)
        assert convert(images) is images  # no Trainer: the inputs as they are
    assert _flags(model) == before and before != [before[0]] * len(before)


@pytest.mark.parametrize("gradients", [False, True])
def test_every_flag_is_restored_after_an_exception(gradients: bool) -> None:
    model = _model()
    before = _flags(model)
    with pytest.raises(RuntimeError, match="inside the pass"), inference_pass(model, None, gradients=gradients):
        raise RuntimeError("inside the pass")
    assert _flags(model) == before
    assert not torch.is_inference_mode_enabled()


def test_the_gradient_pass_records_gradients_even_inside_inference_mode() -> None:
    model = _model()
    before = _flags(model)
    with torch.inference_mode(), gradient_pass(model, None) as convert:  # as inside Lightning's test loop
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        assert not any(_flags(model))
        model(convert(torch.randn(4, 3))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model[0].parameters())
    assert _flags(model) == before


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.bfloat16)])
def test_the_trainers_precision_applies_inside_the_pass(precision: str, dtype: torch.dtype) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, **QUIET)
    layer = nn.Linear(3, 2)
    ready_for_passes(layer, trainer)
    expected_weights = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert layer.weight.dtype == expected_weights
    with inference_pass(layer, trainer) as convert:
        images = convert(torch.randn(4, 3))
        assert images.dtype == (dtype if precision == "bf16-true" else torch.float32)
        assert layer(images).dtype == dtype  # bf16 weights, or autocast for *-mixed
    ready_for_passes(layer, None)  # no Trainer: unchanged
    assert layer.weight.dtype == expected_weights


def _loader(predicted: list[int], labels: list[int], batch_size: int = 2) -> DataLoader:
    """Images whose feature is the one-hot of the class the identity head predicts."""
    images = torch.nn.functional.one_hot(torch.tensor(predicted, dtype=torch.long), 3).float()
    return DataLoader(TensorDataset(images, torch.tensor(labels, dtype=torch.long)), batch_size=batch_size)


HEAD = nn.Linear(3, 3, bias=False)
with torch.no_grad():
    HEAD.weight.copy_(torch.eye(3))


def test_validation_accuracy_counts_correct_over_total_and_averages_the_loaders() -> None:
    half = _loader([0, 1, 2, 0], [0, 1, 0, 1])  # 2 of 4
    three_quarters = _loader([2, 2, 1, 0], [2, 2, 1, 1], batch_size=3)  # 3 of 4, batches of 3 and 1
    device = torch.device("cpu")
    assert validation_accuracy(nn.Identity(), HEAD, half, None, device) == 0.5
    assert validation_accuracy(nn.Identity(), HEAD, [half, three_quarters], None, device) == 0.625  # per-domain mean
    pooled = _loader([0, 1, 2, 0, 2, 2, 1, 0, 1], [0, 1, 0, 1, 2, 2, 1, 1, 1])
    assert validation_accuracy(nn.Identity(), HEAD, pooled, None, device) == pytest.approx(6 / 9)


class _TwoRanks:
    """Rank 0 of two: reduce adds what the other rank counted (it saw one image per loader, all correct)."""

    global_rank, world_size = 0, 2

    def __init__(self) -> None:
        self.reduced: list[torch.Tensor] = []

    def reduce(self, counts: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        self.reduced.append(counts.clone())
        return counts + torch.tensor([[1.0, 1.0]] * len(counts), dtype=counts.dtype)


def test_each_rank_counts_its_share_and_the_counts_are_summed_over_ranks() -> None:
    strategy = _TwoRanks()
    trainer: Any = SimpleNamespace(strategy=strategy, precision_plugin=Precision())
    loader = _loader([0, 1, 2, 0], [0, 0, 2, 2])  # rank 0 reads images 0 and 2: both correct
    accuracy = validation_accuracy(nn.Identity(), HEAD, [loader], trainer, torch.device("cpu"))
    assert strategy.reduced[0].tolist() == [[2.0, 2.0]]
    assert accuracy == 1.0  # (2 + 1) / (2 + 1)


def test_validation_accuracy_needs_labels() -> None:
    images_only = DataLoader(torch.randn(4, 3), batch_size=2)
    with pytest.raises(ValueError, match="yields images without labels; α search needs labels"):
        validation_accuracy(nn.Identity(), HEAD, images_only, None, torch.device("cpu"))


def test_images_and_labels_of_every_batch_shape() -> None:
    images, labels = torch.randn(2, 3), torch.tensor([0, 1])
    assert images_and_labels((images, labels)) == (images, labels)
    assert images_and_labels([images, labels, "extra"]) == (images, labels)
    assert images_and_labels([images]) == (images, None)
    assert images_and_labels(images) == (images, None)


# --- no validation images: an error naming the domains, never an α chosen on nothing ------------------------


def _sources(loaders: Any, train_domains: list[str]) -> Any:
    """A datamodule that names its domains (``DomainNames``) and gives these validation loaders."""
    return SimpleNamespace(val_dataloader=lambda: loaders, train_domains=train_domains, domains=train_domains,
                           test_domains=["target"], default_templates=None)  # fmt: skip


class _NoImages(IterableDataset):
    """A dataset of unknown length that yields nothing (a stream, a filtered folder)."""

    def __iter__(self) -> Any:
        return iter(())


def test_validation_loaders_with_no_images_are_refused_naming_every_empty_domain() -> None:
    empty = _loader([], [])
    with pytest.raises(ValueError, match=r"has no images for 'rot0'; 'rot60': every α would score 0\. Give those"):
        validation_loaders(_sources([empty, _loader([], [])], ["rot0", "rot60"]))
    with pytest.raises(ValueError, match=r"no images for 'rot60': every α"):  # only the empty one is named
        validation_loaders(_sources([_loader([0], [0]), empty], ["rot0", "rot60"]))
    with pytest.raises(ValueError, match=r"no images for 'rot0', 'rot60': every α"):  # one pooled loader
        validation_loaders(_sources(empty, ["rot0", "rot60"]))
    short = DataLoader(TensorDataset(torch.zeros(3, 3), torch.zeros(3)), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match=r"no images for validation loader 1: every α"):  # drop_last: no batch
        validation_loaders(_sources([_loader([0], [0]), short], ["a", "b", "c"]))
    with pytest.raises(ValueError, match="but the datamodule has none"):
        validation_loaders(_sources([], ["rot0"]))
    loaders, names = validation_loaders(_sources([_loader([0], [0]), _loader([1], [1])], ["rot0", "rot60"]))
    assert len(loaders) == 2 and names == ["'rot0'", "'rot60'"]


def test_a_loader_found_empty_only_when_iterated_is_refused_after_the_pass() -> None:
    stream = DataLoader(_NoImages(), batch_size=2)
    loaders, names = validation_loaders(_sources([_loader([0], [0]), stream], ["rot0", "rot60"]))  # length unknown
    with pytest.raises(ValueError, match=r"no images for 'rot60': every α would score 0"):
        validation_accuracy(nn.Identity(), HEAD, loaders, None, torch.device("cpu"), names)
    with pytest.raises(ValueError, match=r"no images for validation loader 0: every α"):
        validation_accuracy(nn.Identity(), HEAD, stream, None, torch.device("cpu"))


class _Rank:
    """One rank of two: reduce adds the other rank's counts."""

    world_size = 2

    def __init__(self, rank: int, others: list[list[float]]) -> None:
        self.global_rank, self.others = rank, torch.tensor(others, dtype=torch.float64)

    def reduce(self, counts: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return counts + self.others


def test_a_rank_whose_share_is_empty_is_no_error_but_no_images_on_any_rank_is_one_on_every_rank() -> None:
    one_image = _loader([1], [1])  # a map-style loader in order: rank 1 of 2 gets no image of it
    rank_one: Any = SimpleNamespace(strategy=_Rank(1, [[1.0, 1.0]]), precision_plugin=Precision())
    assert validation_accuracy(nn.Identity(), HEAD, [one_image], rank_one, torch.device("cpu"), ["'rot0'"]) == 1.0
    for rank in (0, 1):  # both ranks hold the summed counts, so both raise
        nobody: Any = SimpleNamespace(strategy=_Rank(rank, [[0.0, 0.0]]), precision_plugin=Precision())
        with pytest.raises(ValueError, match="no images for 'rot0'"):
            validation_accuracy(nn.Identity(), HEAD, [_loader([], [])], nobody, torch.device("cpu"), ["'rot0'"])
