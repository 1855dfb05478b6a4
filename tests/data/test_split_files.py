"""The list, csv and annotation layouts pick exactly the files the SCORE authors' code picks.

Each reference below re-does what the authors' code does with the file, step by step (their processing
scripts copy files into <split>/<domain>/<class>/ and read the copy with torchvision's ImageFolder), on a
generated folder of tiny images.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from lightning_score.data import DomainDataModule
from tests.data.generate import image, write_list

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def _dm(root: Path, **kwargs) -> DomainDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a paper layout: no "not the paper's split" warning
        dm = DomainDataModule(str(root), num_workers=0, **kwargs)
        _ = dm.index
    return dm


def _copied(dm: DomainDataModule, domain: str, split: str) -> list[tuple[str, str, int]]:
    """Each image as the authors' copy names it: (class folder, file name, label)."""
    return [(dm.class_folders[label], path.name, label) for path, label in dm.samples(domain, split)]


# --- PACS ------------------------------------------------------------------------------------------


def _pacs(root: Path) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """Official-style lists: train 2/3 and crossval 1/3 of each class, test = every image, in a scrambled order."""
    lists = {}
    rng = random.Random(0)
    for domain in PACS_DOMAINS:
        rows = [(f"{domain}/{c}/pic_{i:03d}.jpg", k + 1) for k, c in enumerate(PACS_CLASSES) for i in range(3)]
        for relative, _ in rows:
            image(root / "kfold" / relative)
        rng.shuffle(rows)
        split = {"train": [r for r in rows if not r[0].endswith("2.jpg")], "test": list(rows)}
        split["crossval"] = [r for r in rows if r[0].endswith("2.jpg")]
        for name, part in split.items():
            write_list(root / f"{domain}_{name}_kfold.txt", [f"{p} {y}" for p, y in part])
        lists[domain] = split
    return lists


def test_pacs_reads_the_official_lists_with_1_based_labels(tmp_path: Path) -> None:
    root = tmp_path / "PACS"
    lists = _pacs(root)
    dm = _dm(root, train_domains=["cartoon", "photo"], test_domains=["sketch"])
    assert dm.layout == "pacs_lists" and dm.preset.name == "pacs" and dm.default_templates == "pacs"
    assert dm.domains == PACS_DOMAINS and dm.class_folders == PACS_CLASSES
    for domain in PACS_DOMAINS:
        for split in ("train", "test"):
            # the authors' PACSFromList: the list's order, path under kfold/, label - 1
            assert dm.samples(domain, split) == [(root / "kfold" / p, y - 1) for p, y in lists[domain][split]]
        # the official test list holds the whole domain; validation is what the expert never saw: crossval
        assert sorted(dm.samples(domain, "val")) == sorted(
            (root / "kfold" / p, y - 1) for p, y in lists[domain]["crossval"]
        )
        assert dm.samples(domain, "fit") == dm.samples(domain, "train")


def test_pacs_errors_name_the_list_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "PACS"
    _pacs(root)
    (root / "photo_test_kfold.txt").unlink()
    with pytest.raises(
        ValueError, match=r"'.*photo_test_kfold\.txt' is missing: domain 'photo' has 'photo_train_kfold\.txt'"
    ):
        _ = DomainDataModule(str(root)).domains
    for bad, message in [
        ("0", r"line 2: label '0' is out of range; PACS's lists number the 7 classes 1\.\.7"),
        ("8", r"line 2: label '8' is out of range"),
        ("2", r"line 2: label 2 is class 'dog' here but 'elephant' elsewhere"),
    ]:
        root = tmp_path / f"bad{bad}"
        _pacs(root)
        path = root / "sketch_train_kfold.txt"
        lines = path.read_text().splitlines()
        dog = next(line for line in lines if "/dog/" in line)
        lines.insert(1, dog.rsplit(" ", 1)[0] + f" {bad}")
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"'.*sketch_train_kfold\.txt' {message}"):
            _ = DomainDataModule(str(root)).domains
    shutil.rmtree(tmp_path / "bad0" / "kfold")
    (tmp_path / "bad0" / "sketch_train_kfold.txt").unlink()
    with pytest.raises(ValueError, match=r"line 1 names '.*', which is not under .*ROOT/kfold/<domain>/<class>/"):
        _ = DomainDataModule(str(tmp_path / "bad0")).domains


# --- DomainNet ----------------------------------------------------------------------------------------


def _authors_domainnet_copy(lists_folder: Path, domain: str, split: str, out: Path) -> Path:
    """scripts/DIL/datasets/process_domainnet_dataset.py: copy each listed image to <split>/<domain>/<class>/."""
    for line in (lists_folder / f"{domain}_{split}.txt").read_text().splitlines():
        path = line.split(" ")[0]
        target = out / split / domain / path.split("/")[1]
        target.mkdir(parents=True, exist_ok=True)
        if not (target / path.split("/")[-1]).exists():
            shutil.copy2(lists_folder / path, target)
    return out / split / domain


@pytest.mark.parametrize("arrangement", ["lists_at_root", "lists_in_domain_folders"])
def test_domainnet_reads_the_official_lists(tmp_path: Path, arrangement: str) -> None:
    root = tmp_path / "domainnet"
    classes = ["The_Eiffel_Tower", "aircraft_carrier", "zebra"]
    for domain in ["clipart", "sketch"]:
        folder = root if arrangement == "lists_at_root" else root / domain
        rows = [f"{domain}/{c}/{domain}_{k:03d}_{i:06d}.jpg {k}" for k, c in enumerate(classes) for i in range(5)]
        for row in rows:
            image(folder / row.split()[0])
        random.Random(1).shuffle(rows)
        write_list(folder / f"{domain}_train.txt", [*rows[:11], rows[0]])  # a repeated line counts once
        write_list(folder / f"{domain}_test.txt", rows[11:])
    dm = _dm(root)
    assert dm.layout == "domainnet_lists" and dm.domains == ["clipart", "sketch"] and dm.class_folders == classes
    for domain in dm.domains:
        folder = root if arrangement == "lists_at_root" else root / domain
        for split in ("train", "test"):
            reference = ImageFolder(str(_authors_domainnet_copy(folder, domain, split, tmp_path / "copy")))
            assert reference.classes == classes
            expected = [(Path(p).parent.name, Path(p).name, y) for p, y in reference.imgs]
            assert _copied(dm, domain, split) == expected
            assert all(p.is_file() and p.is_relative_to(folder) for p, _ in dm.samples(domain, split))
    (root / "sketch_test.txt" if arrangement == "lists_at_root" else root / "sketch" / "sketch_test.txt").unlink()
    with pytest.raises(ValueError, match=r"'.*sketch_test\.txt' is missing: domain 'sketch' has 'sketch_train\.txt'"):
        _ = DomainDataModule(str(root)).domains


# --- Fed-ISIC2019 -------------------------------------------------------------------------------------

ISIC_CENTRES = ["BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"]


def _isic(root: Path, rows: list[tuple[str, int, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train_test_split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "MEL", "NV", "target", "center", "fold", "fold2"])
        for name, target, fold2 in rows:
            writer.writerow([name, 0.0, 1.0, target, fold2.split("_")[1], fold2.split("_")[0], fold2])
            image(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
    return root


def test_fed_isic2019_reads_the_flamby_csv(tmp_path: Path) -> None:
    rows = [(f"ISIC_{i:07d}" + ("_downsampled" if i % 7 == 0 else ""), i % 8, f"{'train' if i % 5 else 'test'}_{i % 6}")
            for i in range(60)]  # fmt: skip
    root = _isic(tmp_path / "fed_isic2019", rows)
    dm = _dm(root, train_domains=["BCN", "MSK"])
    assert (
        dm.layout == "fed_isic2019_csv" and dm.preset.name == "fed_isic2019" and dm.default_templates == "fed_isic2019"
    )
    assert dm.domains == sorted(ISIC_CENTRES) and dm.num_classes == 8
    assert dm.classnames[:2] == ["Melanoma", "Melanocytic nevus"] and dm.preset.score_options == {
        "divide_by_tasks": False
    }
    for c, centre in enumerate(ISIC_CENTRES):
        for split in ("train", "test"):
            # the authors' _FedISIC: rows with fold2 == f"{split}_{centre index}", in the csv's order
            expected = [(root / "ISIC_2019_Training_Input" / f"{n}.jpg", t) for n, t, f in rows if f == f"{split}_{c}"]
            assert dm.samples(centre, split) == expected


def test_fed_isic2019_errors(tmp_path: Path) -> None:
    good = [(f"ISIC_{i:07d}", 1, f"{s}_{c}") for c in range(6) for i, s in enumerate(["train", "test"])]
    root = _isic(tmp_path / "target", [*good[:3], ("ISIC_9", 8, "train_0"), *good[3:]])
    with pytest.raises(ValueError, match=r"train_test_split\.csv' line 5: target '8' is out of range.*0\.\.7"):
        _ = DomainDataModule(str(root)).domains
    root = _isic(tmp_path / "fold", [*good, ("ISIC_9", 1, "val_0")])
    with pytest.raises(ValueError, match=r"fold2 'val_0' must be train_<c> or test_<c>"):
        _ = DomainDataModule(str(root)).domains
    root = _isic(tmp_path / "nosplit", [r for r in good if r[2] != "test_4"])
    with pytest.raises(ValueError, match=r"Domain 'MSK' of .* has no test images"):
        _ = DomainDataModule(str(root)).domains


# --- TerraIncognita -----------------------------------------------------------------------------------

TERRA_CLASSES = ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"]


def _terra(root: Path) -> None:
    """Three of the five annotation files, with rows the script must drop or repeat."""
    rng = random.Random(3)
    categories = [{"id": i, "name": n} for i, n in enumerate([*TERRA_CLASSES, "car"])]
    next_id = 0
    for name in ["train_annotations.json", "cis_val_annotations.json", "trans_test_annotations.json"]:
        images, annotations = [], []
        for _ in range(40):
            location = rng.choice([38, 43, "46", 100, 99])  # 99 is not one of the four; ids as int or str
            file_name = f"img{next_id:04d}.jpg"
            images.append({"id": f"id{next_id}", "file_name": file_name, "location": location})
            image(root / "eccv_18_all_images_sm" / file_name)
            for _ in range(rng.choice([1, 1, 1, 2])):  # some images carry two boxes (a repeated row)
                annotations.append({"image_id": f"id{next_id}", "category_id": rng.choice(range(11))})
            next_id += 1
        rng.shuffle(annotations)
        path = root / "eccv_18_annotation_files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def _authors_terra_copy(root: Path, out: Path) -> None:
    """scripts/DIL/datasets/process_terraincognita_dataset.py, step by step."""
    data: dict[str, list] = {}
    for name in ["cis_val", "train", "trans_val", "cis_test", "trans_test"]:
        path = root / "eccv_18_annotation_files" / f"{name}_annotations.json"
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                data.setdefault(key, []).extend(value)
    names = {c["id"]: c["name"] for c in data["categories"]}
    rows = []  # the DataFrame's rows; its index is the position in this list
    for img in data["images"]:
        if str(img["location"]) not in ["38", "46", "100", "43"]:
            continue
        for annotation in data["annotations"]:
            if annotation["image_id"] == img["id"] and names[annotation["category_id"]] in TERRA_CLASSES:
                rows.append((f"location_{img['location']}", names[annotation["category_id"]], img["file_name"]))
    for location in {r[0] for r in rows}:
        indices = [i for i, r in enumerate(rows) if r[0] == location]
        random.Random(17).shuffle(indices)
        cut = int(len(indices) * 0.8)
        for split, part in (("train", indices[:cut]), ("test", indices[cut:])):
            for i in part:
                folder = out / split / location / rows[i][1]
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / "eccv_18_all_images_sm" / rows[i][2], folder)


def test_terra_incognita_splits_each_location_as_the_authors_script(tmp_path: Path) -> None:
    root = tmp_path / "terra_incognita"
    _terra(root)
    _authors_terra_copy(root, tmp_path / "copy")
    dm = _dm(root)
    assert dm.layout == "terra_annotations" and dm.default_templates == "terra_incognita"
    assert (
        dm.domains == ["location_100", "location_38", "location_43", "location_46"]
        and dm.class_folders == TERRA_CLASSES
    )
    for domain in dm.domains:
        for split in ("train", "test"):
            reference = ImageFolder(str(tmp_path / "copy" / split / domain), allow_empty=True)
            expected = [
                (Path(p).parent.name, Path(p).name, TERRA_CLASSES.index(reference.classes[y]))
                for p, y in reference.imgs
            ]
            assert _copied(dm, domain, split) == expected
        # a repeated row split across train and test puts one image in both: validation never holds it
        assert not {p for p, _ in dm.samples(domain, "val")} & {p for p, _ in dm.samples(domain, "train")}
