"""DatasetIndex: what every reader returns (domains sorted, no empty split), and the missing-class warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lightning_score.data.index import LAYOUTS, DatasetIndex, DomainSamples, index_of, warn_missing_classes

ROOT = Path("/data/office")


def _samples(domain: str, n: int, label: int = 0) -> list[tuple[Path, int]]:
    return [(ROOT / domain / f"{i}.jpg", label) for i in range(n)]


def test_index_of_builds_an_index_with_domains_sorted() -> None:
    splits = {
        "product": (_samples("product", 3), _samples("product", 1, label=1)),
        "art": (_samples("art", 2), _samples("art", 2)),
        "clipart": (_samples("clipart", 1), _samples("clipart", 1)),
    }
    index = index_of(ROOT, "unsplit", ["chair", "desk"], splits)
    assert isinstance(index, DatasetIndex)
    assert index.root == ROOT and index.layout == "unsplit" and index.classes == ("chair", "desk")
    assert list(index.domains) == ["art", "clipart", "product"]
    for domain, (train, test) in splits.items():
        assert index.domains[domain] == DomainSamples(train=tuple(train), test=tuple(test))
    assert isinstance(index.domains["art"].train, tuple)  # frozen: a later edit of the lists changes nothing
    splits["art"][0].clear()
    assert len(index.domains["art"].train) == 2


@pytest.mark.parametrize("empty", ["train", "test"])
@pytest.mark.parametrize("layout", ["unsplit", "pacs_lists", "terra_annotations"])
def test_index_of_refuses_an_empty_split_naming_the_domain_and_the_layouts_rule(empty: str, layout: str) -> None:
    splits = {
        "art": (_samples("art", 2), _samples("art", 1)),
        "sketch": ([] if empty == "train" else _samples("sketch", 2), [] if empty == "test" else _samples("sketch", 1)),
    }
    with pytest.raises(ValueError) as caught:
        index_of(ROOT, layout, ["chair"], splits)
    assert str(caught.value) == (
        f"Domain 'sketch' of '{ROOT}' ({LAYOUTS[layout]}) has no {empty} images. Every domain needs both a train and "
        "a test split: add its images, or remove the domain."
    )


def test_the_first_empty_split_in_domain_order_is_the_one_named() -> None:
    splits = {"zoo": ([], []), "beach": (_samples("beach", 1), [])}
    with pytest.raises(ValueError, match=r"^Domain 'beach' .* has no test images"):
        index_of(ROOT, "unsplit", ["shell"], splits)


def test_every_layout_has_a_rule_to_name() -> None:
    assert all(isinstance(rule, str) and rule for rule in LAYOUTS.values())


def test_warn_missing_classes_logs_once_per_folder_naming_its_missing_classes(caplog: pytest.LogCaptureFixture) -> None:
    classes = ["bird", "cat", "dog", "horse"]
    found = {
        "/d/train/alpha": {"bird", "cat", "dog", "horse"},
        "/d/test/alpha": {"cat", "horse"},
        "/d/test/beta": {"dog"},
    }
    with caplog.at_level(logging.WARNING, logger="lightning_score.data.index"):
        warn_missing_classes("Pre-split dataset '/d'", classes, found)
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_score.data.index"]
    assert messages == [
        "Pre-split dataset '/d': '/d/test/alpha' has no folder for classes ['bird', 'dog']; they have no images there.",
        "Pre-split dataset '/d': '/d/test/beta' has no folder for classes ['bird', 'cat', 'horse']; they have no "
        "images there.",
    ]  # in the classes' label order, nothing for the complete folder
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_warn_missing_classes_is_silent_when_every_folder_is_complete(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lightning_score.data.index"):
        warn_missing_classes("Dataset", ["a", "b"], {"x": {"a", "b"}, "y": {"b", "a", "extra"}})
        warn_missing_classes("Dataset", [], {"x": set()})
    assert caplog.records == []
