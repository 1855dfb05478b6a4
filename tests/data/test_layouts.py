"""detect_layout and read_dataset: every layout of the table detected, read by its own reader, malformed roots refused.

The list, csv and annotation readers are checked against the authors' code in ``test_split_files.py``; here
only that ``read_dataset`` hands them the right arguments.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

import lightning_score.data.layouts as layouts
from lightning_score.data.images import image_folder_samples
from lightning_score.data.index import LAYOUTS, DatasetIndex
from lightning_score.data.layouts import detect_layout, read_dataset
from lightning_score.data.presets import get_preset
from lightning_score.data.splits import random_split_indices
from tests.data.generate import domainbed, image, write_list

CLASSES = ["cat", "dog"]


def _presplit(root: Path) -> Path:
    domainbed(root / "train", {d: {c: 3 for c in CLASSES} for d in ("alpha", "beta")})
    domainbed(root / "test", {d: {c: 1 for c in CLASSES} for d in ("alpha", "beta")})
    return root


def _filename_domains(folder: Path, per_domain: int, domains: tuple[str, ...] = ("clipart", "sketch")) -> None:
    for name in CLASSES:
        for domain in domains:
            for i in range(per_domain):
                image(folder / name / f"{domain}_{i}.png")


def _presplit_filename_domains(root: Path) -> Path:
    _filename_domains(root / "train", 3)
    _filename_domains(root / "test", 1)
    return root


def _pacs_lists(root: Path) -> Path:
    return write_list(root / "photo_train_kfold.txt", ["photo/dog/1.jpg 1"]).parent


def _domainnet_lists(root: Path) -> Path:
    return write_list(root / "clipart_train.txt", ["clipart/cat/1.jpg 0"]).parent


def _domainnet_lists_in_domain_folders(root: Path) -> Path:
    write_list(root / "clipart" / "clipart_train.txt", ["clipart/cat/1.jpg 0"])
    return root


def _fed_isic2019_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    with open(root / "train_test_split.csv", "w", newline="") as handle:
        csv.writer(handle).writerow(["image", "target", "fold2"])
    return root


def _terra_annotations(root: Path) -> Path:
    (root / "eccv_18_annotation_files").mkdir(parents=True)
    return root


def _unsplit_filename_domains(root: Path) -> Path:
    _filename_domains(root, 5)
    return root


def _unsplit(root: Path) -> Path:
    return domainbed(root, {d: {c: 5 for c in CLASSES} for d in ("alpha", "beta", "gamma")})


BUILDERS: list[tuple[str, Callable[[Path], Path]]] = [
    ("presplit", _presplit),
    ("presplit_filename_domains", _presplit_filename_domains),
    ("pacs_lists", _pacs_lists),
    ("domainnet_lists", _domainnet_lists),
    ("domainnet_lists", _domainnet_lists_in_domain_folders),
    ("fed_isic2019_csv", _fed_isic2019_csv),
    ("terra_annotations", _terra_annotations),
    ("unsplit_filename_domains", _unsplit_filename_domains),
    ("unsplit", _unsplit),
]


# --- detect_layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "build"), BUILDERS, ids=[b.__name__.lstrip("_") for _, b in BUILDERS])
def test_every_layout_of_the_table_is_detected(tmp_path: Path, layout: str, build: Callable[[Path], Path]) -> None:
    assert detect_layout(build(tmp_path / "data")) == layout


def test_the_table_names_every_layout_detect_layout_returns() -> None:
    assert {layout for layout, _ in BUILDERS} == set(LAYOUTS)


def test_the_first_matching_layout_wins(tmp_path: Path) -> None:
    presplit = _presplit(tmp_path / "presplit")
    write_list(presplit / "photo_train_kfold.txt", [])  # a stray list beside train/ and test/
    assert detect_layout(presplit) == "presplit"
    pacs = _pacs_lists(tmp_path / "pacs")
    write_list(pacs / "photo_train.txt", [])
    assert detect_layout(pacs) == "pacs_lists"
    lists = _domainnet_lists(tmp_path / "lists")
    (lists / "train_test_split.csv").write_text("")
    assert detect_layout(lists) == "domainnet_lists"


def test_a_train_folder_without_a_test_folder_is_not_presplit(tmp_path: Path) -> None:
    root = domainbed(tmp_path / "data", {"train": {"cat": 2}, "photo": {"cat": 2}})
    assert detect_layout(root) == "unsplit"


def test_hidden_folders_do_not_decide_the_layout(tmp_path: Path) -> None:
    root = _unsplit(tmp_path / "data")
    image(root / ".thumbnails" / "0.png")  # would look like <class>/<image> if it counted
    assert detect_layout(root) == "unsplit"


# --- read_dataset: the split-file readers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reader", "build", "expected"),
    [
        ("read_pacs_lists", _pacs_lists, "root, preset"),
        ("read_domainnet_lists", _domainnet_lists, "root"),
        ("read_fed_isic2019_csv", _fed_isic2019_csv, "root, preset"),
        ("read_terra_annotations", _terra_annotations, "root, fraction, seed"),
    ],
)
def test_read_dataset_hands_a_split_file_layout_to_its_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str, build: Callable[[Path], Path], expected: str
) -> None:
    calls = []
    sentinel = object()

    def fake(*args: object) -> object:
        calls.append(args)
        return sentinel

    monkeypatch.setattr(layouts, reader, fake)
    root = build(tmp_path / "data")
    preset = get_preset("pacs")
    values = {"root": root, "preset": preset, "fraction": 0.25, "seed": 3}
    assert read_dataset(root, test_fraction=0.25, split_seed=3, preset=preset) is sentinel
    assert calls == [tuple(values[name] for name in expected.split(", "))]


# --- read_dataset: the folder layouts -------------------------------------------------------------------


def test_a_presplit_folder_is_read_as_is(tmp_path: Path) -> None:
    root = _presplit(tmp_path / "data")
    index = read_dataset(root)
    assert isinstance(index, DatasetIndex) and index.layout == "presplit" and index.root == root
    assert index.classes == tuple(CLASSES) and list(index.domains) == ["alpha", "beta"]
    for domain, part in index.domains.items():
        assert list(part.train) == image_folder_samples(root / "train" / domain, CLASSES)
        assert list(part.test) == image_folder_samples(root / "test" / domain, CLASSES)


def test_a_presplit_folder_with_filename_domains_groups_images_by_prefix(tmp_path: Path) -> None:
    root = _presplit_filename_domains(tmp_path / "data")
    index = read_dataset(root)
    assert index.layout == "presplit_filename_domains" and index.classes == tuple(CLASSES)
    assert list(index.domains) == ["clipart", "sketch"]
    for domain, part in index.domains.items():
        for split, samples in (("train", part.train), ("test", part.test)):
            expected = [s for s in image_folder_samples(root / split, CLASSES) if s[0].name.startswith(domain + "_")]
            assert list(samples) == expected and len(expected) == (3 if split == "train" else 1) * len(CLASSES)


@pytest.mark.parametrize(("fraction", "seed"), [(0.2, 17), (0.4, 3)])
def test_an_unsplit_folder_gets_one_random_split_per_domain(tmp_path: Path, fraction: float, seed: int) -> None:
    root = _unsplit(tmp_path / "data")
    index = read_dataset(root, test_fraction=fraction, split_seed=seed)
    assert index.layout == "unsplit" and index.classes == tuple(CLASSES)
    assert list(index.domains) == ["alpha", "beta", "gamma"]
    for domain, part in index.domains.items():
        samples = image_folder_samples(root / domain, CLASSES)
        train, test = random_split_indices(len(samples), fraction, seed)
        assert list(part.train) == [samples[i] for i in sorted(train)]
        assert list(part.test) == [samples[i] for i in sorted(test)]
    assert read_dataset(root, 0.2, 17) != read_dataset(root, 0.2, 18)  # the seed is used


def test_an_unsplit_folder_with_filename_domains_is_split_once_then_grouped(tmp_path: Path) -> None:
    root = _unsplit_filename_domains(tmp_path / "data")
    index = read_dataset(root)
    assert index.layout == "unsplit_filename_domains" and index.classes == tuple(CLASSES)
    samples = image_folder_samples(root, CLASSES)  # every domain's images in one list
    train, test = random_split_indices(len(samples), 0.2, 17)
    for domain, part in index.domains.items():
        mine = [i for i, (path, _) in enumerate(samples) if path.name.startswith(domain + "_")]
        assert list(part.train) == [samples[i] for i in sorted(train) if i in mine]
        assert list(part.test) == [samples[i] for i in sorted(test) if i in mine]
    assert sum(len(p.train) for p in index.domains.values()) == int(0.8 * len(samples))


def test_imagenet_r_class_folders_are_renamed_by_the_readme_and_ordered_by_the_new_name(tmp_path: Path) -> None:
    root = tmp_path / "imagenet-r"
    for wnid in ("n00000001", "n00000002"):
        for domain in ("art", "toy"):
            for i in range(4):
                image(root / wnid / f"{domain}_{i}.png")
    (root / "README.txt").write_text("ImageNet-R\nn00000001 zebra\nn00000002 goldfish\nnot a line of the map\n")
    index = read_dataset(root)
    assert index.classes == ("goldfish", "zebra")
    for part in index.domains.values():
        for path, label in (*part.train, *part.test):
            assert index.classes[label] == {"n00000001": "zebra", "n00000002": "goldfish"}[path.parent.name]


# --- malformed roots ------------------------------------------------------------------------------------


def test_a_missing_root_says_what_to_point_it_at(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Dataset root '.*nowhere' does not exist\. Point `root` at"):
        read_dataset(tmp_path / "nowhere")


def test_a_file_as_root_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"Dataset root '.*data\.zip' is a file; it must be a dataset folder"):
        read_dataset(path)


def test_a_root_without_domain_folders_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no folders here")
    with pytest.raises(ValueError, match=r"Dataset root '.*empty' has no domain folders; expected ROOT/<domain>/"):
        read_dataset(tmp_path / "empty")
    (tmp_path / "presplit" / "train").mkdir(parents=True)
    (tmp_path / "presplit" / "test").mkdir()
    with pytest.raises(ValueError, match=r"pre-split dataset '.*presplit' has no domain folders in train/ and test/"):
        read_dataset(tmp_path / "presplit")


@pytest.mark.parametrize("build", [_presplit_filename_domains, _unsplit_filename_domains])
def test_a_file_without_a_domain_prefix_is_named(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    root = build(tmp_path / "data")
    folder = root / "train" if (root / "train").is_dir() else root
    bad = image(folder / "dog" / "nodomain.png")  # the second class folder: detection reads only the first
    assert detect_layout(root) == build.__name__.lstrip("_")
    with pytest.raises(ValueError, match=r"has no domain prefix") as caught:
        read_dataset(root)
    assert f"Image '{bad}'" in str(caught.value)
    assert "<class>/<domain>_<n>.jpg" in str(caught.value) and "Rename it" in str(caught.value)


def test_unsplit_domains_with_different_class_folders_are_refused_naming_both(tmp_path: Path) -> None:
    root = domainbed(tmp_path / "data", {"alpha": {"cat": 2, "dog": 2}, "beta": {"cat": 2, "owl": 2}})
    with pytest.raises(ValueError, match=r"^Class folders differ between domains") as caught:
        read_dataset(root)
    message = str(caught.value)
    assert f"'{root / 'beta'}' has ['owl'] that '{root / 'alpha'}' lacks, and lacks ['dog']" in message
    assert "create the missing ones, even empty" in message


def test_an_unsplit_domain_folder_without_images_is_named(tmp_path: Path) -> None:
    root = domainbed(tmp_path / "data", {"alpha": {"cat": 3}})
    (root / "beta" / "cat").mkdir(parents=True)
    (root / "beta" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"Domain folder '.*beta' has no images: expected <class>/<image>"):
        read_dataset(root)


def test_a_presplit_folder_with_domains_in_one_split_only_names_them(tmp_path: Path) -> None:
    root = _presplit(tmp_path / "data")
    domainbed(root / "test", {"gamma": {"cat": 1}})
    with pytest.raises(
        ValueError, match=r"different domains in train/ .*none only in train/, \['gamma'\] only in test/"
    ):
        read_dataset(root)
