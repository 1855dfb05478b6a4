"""classifier: what CLIPClassifier reads from a datamodule (data.protocols), its templates, and balanced accuracy."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, TensorDataset

from lightning_score.classifier import BalancedAccuracy, CLIPClassifier, balanced_accuracy, per_class_counts
from lightning_score.data import ClassNames, DomainNames, SourceDomains
from lightning_score.data import TestDomains as HasTestDomains  # a Test* name would be collected by pytest
from tests.experts import MODEL, QUIET, digits

CLASSES = [str(i) for i in range(10)]


class OnlyClassNames(L.LightningDataModule):
    """A user's datamodule: class names and a test loader, none of SourceDomains' domains."""

    classnames = CLASSES

    def test_dataloader(self) -> DataLoader:
        images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(images, torch.arange(6) % 10), batch_size=3)


class NamedTestDomain(OnlyClassNames):
    """A user's datamodule that names its test domain, and nothing else of SourceDomains."""

    test_domains = ("mine",)


class Domains(L.LightningDataModule):
    """A SourceDomains with the given template set and domains."""

    def __init__(self, default_templates: str | None, domains: list[str]) -> None:
        super().__init__()
        self.classnames, self.default_templates, self.domains = CLASSES, default_templates, domains
        self.train_domains, self.test_domains = domains[:-1], domains[-1:]

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> Any:
        raise AssertionError("not read here")


def test_the_protocols_tell_the_datamodules_apart() -> None:
    assert isinstance(OnlyClassNames(), ClassNames) and not isinstance(OnlyClassNames(), SourceDomains)
    assert isinstance(Domains(None, ["a", "b"]), SourceDomains)
    assert isinstance(digits(train_domains=["rot0"], test_domains=["rot30"]), SourceDomains)


def test_a_datamodule_with_only_class_names_gets_the_defaults(quick_base: Path) -> None:
    module = CLIPClassifier(MODEL, str(quick_base))
    results = L.Trainer(**QUIET).test(module, datamodule=OnlyClassNames(), verbose=False)[0]
    assert module.head is not None and list(module.head.classnames) == CLASSES
    assert module.template_set == "imagenet"  # no template set or domains to choose one from
    assert set(results) == {"test/domain0/acc", "test/domain0/balanced_acc"}  # no test_domains to name it


def test_a_datamodule_naming_its_test_domain_names_the_metrics(quick_base: Path) -> None:
    assert isinstance(NamedTestDomain(), HasTestDomains) and not isinstance(NamedTestDomain(), DomainNames)
    module = CLIPClassifier(MODEL, str(quick_base))
    results = L.Trainer(**QUIET).test(module, datamodule=NamedTestDomain(), verbose=False)[0]
    assert set(results) == {"test/mine/acc", "test/mine/balanced_acc"}
    assert module.template_set == "imagenet"  # no domains or template set of its own


def test_class_names_given_need_no_datamodule(quick_base: Path) -> None:
    module = CLIPClassifier(MODEL, str(quick_base), templates="digits", classnames=CLASSES)
    head = module.head
    module.setup("test")  # no Trainer, no datamodule: the head is kept
    assert module.head is head and list(head.classnames) == CLASSES
    without = CLIPClassifier(MODEL, str(quick_base), templates="digits")
    with pytest.raises(ValueError, match="CLIPClassifier needs class names for its zero-shot head"):
        without.setup("test")


def test_resolve_templates_prefers_the_setting_then_the_datamodules_set_then_its_domains(
    quick_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = CLIPClassifier(MODEL, str(quick_base))
    for datamodule, expected in [
        (None, "imagenet"),
        (OnlyClassNames(), "imagenet"),
        (Domains("medical_retina", ["photo", "sketch"]), "medical_retina"),  # its own set first
        (Domains(None, ["art_painting", "sketch", "photo"]), "pacs"),  # guessed from the domains
        (Domains(None, ["my_domain", "other"]), "imagenet"),
    ]:
        monkeypatch.setattr(module, "_datamodule", lambda datamodule=datamodule: datamodule)
        assert module.resolve_templates() == expected, datamodule
    explicit = CLIPClassifier(MODEL, str(quick_base), templates="digits")
    monkeypatch.setattr(explicit, "_datamodule", lambda: Domains("pacs", ["photo", "sketch"]))
    assert explicit.resolve_templates() == "digits"


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Targets missing some classes, predictions that never name others (one present in the targets)."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(3, 12))
    present = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    predicted = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    size = int(rng.integers(1, 200))
    target = torch.as_tensor(rng.choice(present, size=size))
    preds = torch.as_tensor(rng.choice(predicted, size=size))
    return preds, target, num_classes


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # on purpose: never-present classes
@pytest.mark.parametrize("seed", range(40))
def test_balanced_accuracy_is_sklearns_on_random_inputs(seed: int) -> None:
    preds, target, num_classes = _random_case(seed)
    correct, total = per_class_counts(preds, target, num_classes)
    assert total.tolist() == np.bincount(target.numpy(), minlength=num_classes).tolist()
    assert correct.tolist() == [int(((preds == c) & (target == c)).sum()) for c in range(num_classes)]
    expected = balanced_accuracy_score(target.numpy(), preds.numpy())
    assert float(balanced_accuracy(correct, total)) == pytest.approx(expected, rel=1e-6)
    logits = torch.nn.functional.one_hot(preds, num_classes).float() + 0.01 * torch.rand(len(preds), num_classes)
    assert per_class_counts(logits, target, num_classes)[0].tolist() == correct.tolist()  # logits or labels alike
    metric = BalancedAccuracy(num_classes)
    for part in range(0, len(target), 17):  # over batches, the same
        metric.update(preds[part : part + 17], target[part : part + 17])
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_leaves_out_absent_classes_and_counts_never_predicted_ones() -> None:
    # class 0: 2 of 3 right; class 1: present, never predicted (0 of 2); class 2: predicted, never a target;
    # class 3: neither.
    target = torch.tensor([0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 2, 2, 0])
    correct, total = per_class_counts(preds, target, num_classes=4)
    assert correct.tolist() == [2, 0, 0, 0] and total.tolist() == [3, 2, 0, 0]
    value = float(balanced_accuracy(correct, total))
    assert value == pytest.approx((2 / 3 + 0 / 2) / 2)  # the mean over the two classes present, not over four
    assert value == pytest.approx(balanced_accuracy_score(target.numpy(), preds.numpy()))
    metric = BalancedAccuracy(num_classes=4)
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])
    assert float(metric.compute()) == pytest.approx(value)


def test_test_dataloaders_are_named_after_a_source_domains_test_domains(
    quick_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = CLIPClassifier(MODEL, str(quick_base), templates="digits", classnames=CLASSES)
    for datamodule, count, expected in [
        (Domains(None, ["a", "b", "c"]), 1, ["c"]),
        (Domains(None, ["a", "b", "c"]), 2, ["domain0", "domain1"]),  # not one name per dataloader: the defaults
        (OnlyClassNames(), 1, ["domain0"]),  # no test_domains
        (None, 2, ["domain0", "domain1"]),
    ]:
        monkeypatch.setattr(module, "_datamodule", lambda datamodule=datamodule: datamodule)
        assert module._test_domains(count) == expected, datamodule


def test_templates_naming_a_held_out_domain_warn_unless_they_are_the_datasets_own(
    quick_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = CLIPClassifier(MODEL, str(quick_base))
    templates = ["a photo of a {}.", "a sketch of a {}."]
    monkeypatch.setattr(module, "_datamodule", lambda: Domains(None, ["photo", "sketch"]))  # sketch is held out
    with pytest.warns(UserWarning, match=r"Template set 'mine' names the held-out domain\(s\) \['sketch'\]"):
        module._warn_if_templates_name_held_out_domains("mine", templates)
    monkeypatch.setattr(module, "_datamodule", lambda: Domains("mine", ["photo", "sketch"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._warn_if_templates_name_held_out_domains("mine", templates)  # the dataset's own set: exempt
        for datamodule in (OnlyClassNames(), None):  # no domains known: nothing to warn about
            monkeypatch.setattr(module, "_datamodule", lambda datamodule=datamodule: datamodule)
            module._warn_if_templates_name_held_out_domains("mine", templates)
