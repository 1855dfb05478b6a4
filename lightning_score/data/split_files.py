"""Datasets whose split comes in a file: PACS's and DomainNet's lists, Fed-ISIC2019's csv, TerraIncognita's annotations.

Each reader follows what the SCORE authors' code does with the file (``VirtualSpaceman/score_cvpr26``:
``src/datasets/*.py`` and ``scripts/DIL/datasets/*``) and returns a
:class:`~lightning_score.data.layouts.DatasetIndex`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from lightning_score.data.images import Sample, subfolders
from lightning_score.data.index import DatasetIndex, index_of
from lightning_score.data.presets import DatasetPreset, get_preset
from lightning_score.data.splits import shuffled_split_indices

__all__ = ["read_domainnet_lists", "read_fed_isic2019_csv", "read_pacs_lists", "read_terra_annotations"]


def _list_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line number, image path, label)`` of each non-empty line ``<path> <label>``."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(
                    f"'{path}' line {number} reads {line.strip()!r}; each line must be '<image path> <label>'. Fix "
                    "the line (a path with spaces is not supported)."
                )
            yield number, fields[0], fields[1]


def _missing_list(path: Path, domain: str, other: Path) -> ValueError:
    return ValueError(
        f"'{path}' is missing: domain '{domain}' has '{other.name}' but not its other split list. Put "
        f"'{path.name}' next to it (from the dataset's official release), or remove '{other.name}'."
    )


def _check_first_image(images: Path, relative: str, list_file: Path, hint: str) -> None:
    if not (images / relative).is_file():
        raise ValueError(f"'{list_file}' line 1 names '{relative}', which is not under '{images}'. {hint}")


# --- PACS: <domain>_train_kfold.txt / <domain>_test_kfold.txt, labels 1-based --------------------------


def read_pacs_lists(root: Path, preset: DatasetPreset | None = None) -> DatasetIndex:
    """PACS's official lists: ``ROOT/<domain>_{train,test}_kfold.txt``, images under ``ROOT/kfold/`` or ``ROOT/``.

    A line is ``art_painting/dog/pic_001.jpg 1``: labels are 1-based, the class name is the path's folder.
    Images keep the list's order (the authors read the lists as they are). The official test list of a
    domain holds all of its images (train and cross-validation ones too).
    """
    images = root / "kfold" if (root / "kfold").is_dir() else root
    suffix = "_train_kfold.txt"
    domains = sorted(p.name[: -len(suffix)] for p in root.glob(f"*{suffix}"))
    limit = (preset or get_preset("pacs")).num_classes
    names: dict[int, str] = {}
    read: dict[str, list[tuple[str, int]]] = {}
    for domain in domains:
        for split in ("train", "test"):
            path = root / f"{domain}_{split}_kfold.txt"
            if not path.is_file():
                raise _missing_list(path, domain, root / f"{domain}{suffix}")
            rows = []
            for number, relative, label in _list_lines(path):
                if not label.isdigit() or not 1 <= int(label) <= limit:
                    raise ValueError(
                        f"'{path}' line {number}: label {label!r} is out of range; PACS's lists number the {limit} "
                        f"classes 1..{limit}. Fix the line, or use the official list."
                    )
                folder = PurePosixPath(relative).parent.name
                if names.setdefault(int(label), folder) != folder:
                    raise ValueError(
                        f"'{path}' line {number}: label {label} is class '{folder}' here but '{names[int(label)]}' "
                        "elsewhere in the lists. Fix the label."
                    )
                rows.append((relative, int(label) - 1))
            if rows:
                _check_first_image(
                    images,
                    rows[0][0],
                    path,
                    "PACS's images go in ROOT/kfold/<domain>/<class>/ (the official "
                    "archive) or ROOT/<domain>/<class>/, next to the lists.",
                )
            read[f"{domain}/{split}"] = rows
    unnamed = [label for label in range(1, max(names, default=0) + 1) if label not in names]
    if unnamed:
        raise ValueError(f"The PACS lists in '{root}' never use labels {unnamed}, so those classes have no name.")
    classes = [names[label] for label in sorted(names)]
    splits = {d: tuple([(images / rel, y) for rel, y in read[f"{d}/{s}"]] for s in ("train", "test")) for d in domains}
    return index_of(root, "pacs_lists", classes, splits)


# --- DomainNet: <domain>_train.txt / <domain>_test.txt ------------------------------------------------


def read_domainnet_lists(root: Path) -> DatasetIndex:
    """DomainNet's official lists ``<domain>_{train,test}.txt`` in ``ROOT/`` or ``ROOT/<domain>/``.

    Image paths are relative to the list's folder; the class is the path's folder (as the authors' script
    copies each image to ``<split>/<domain>/<class>/``, so a repeated line counts once). Images come in
    ImageFolder order of that copy: by class, then file name.
    """
    places = {p.name[: -len("_train.txt")]: root for p in root.glob("*_train.txt")}
    places.update({d.name: d for d in subfolders(root) if (d / f"{d.name}_train.txt").is_file()})
    read: dict[str, dict[tuple[str, str], Path]] = {}
    for domain, folder in places.items():
        for split in ("train", "test"):
            path = folder / f"{domain}_{split}.txt"
            if not path.is_file():
                raise _missing_list(path, domain, folder / f"{domain}_train.txt")
            rows: dict[tuple[str, str], Path] = {}
            for number, relative, label in _list_lines(path):
                if not label.lstrip("-").isdigit():
                    raise ValueError(f"'{path}' line {number}: label {label!r} is not a number. Fix the line.")
                pure = PurePosixPath(relative)
                if not rows:
                    _check_first_image(folder, relative, path, "DomainNet's lists name images relative to their own "
                                       "folder: extract each <domain>.zip next to its lists.")  # fmt: skip
                rows.setdefault((pure.parent.name, pure.name), folder / relative)
            read[f"{domain}/{split}"] = rows
    classes = sorted({name for rows in read.values() for name, _ in rows})
    label = {name: i for i, name in enumerate(classes)}
    splits = {
        d: tuple([(read[f"{d}/{s}"][k], label[k[0]]) for k in sorted(read[f"{d}/{s}"])] for s in ("train", "test"))
        for d in places
    }
    return index_of(root, "domainnet_lists", classes, splits)


# --- Fed-ISIC2019: FLamby's train_test_split.csv ------------------------------------------------------


def read_fed_isic2019_csv(root: Path, preset: DatasetPreset | None = None) -> DatasetIndex:
    """Fed-ISIC2019 from FLamby's ``train_test_split.csv`` and ``ISIC_2019_Training_Input/<image>.jpg``.

    Column ``fold2`` (``train_3``) gives each image's split and centre; the centre's index names the domain
    and ``target`` (0-7) the class, both in the preset's order (the authors'). Images keep the csv's order.
    """
    preset = preset if preset is not None and preset.classes else get_preset("fed_isic2019")
    assert preset.classes is not None
    table = root / "train_test_split.csv"
    images = next((root / n for n in ("ISIC_2019_Training_Input", "ISIC_2019_Training_Input_preprocessed")
                   if (root / n).is_dir()), None)  # fmt: skip
    if images is None:
        raise ValueError(
            f"'{root}' has {table.name} but no ISIC_2019_Training_Input/ folder of images next to it. Download "
            "the ISIC 2019 training images there (FLamby's download script does)."
        )
    splits: dict[str, tuple[list[Sample], list[Sample]]] = {d: ([], []) for d in preset.domains}
    with open(table, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "target", "fold2"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"'{table}' lacks the columns {sorted(missing)}; use FLamby's train_test_split.csv.")
        for number, row in enumerate(reader, start=2):
            split, _, centre = row["fold2"].rpartition("_")
            target = row["target"]
            if split not in ("train", "test") or not centre.isdigit() or int(centre) >= len(preset.domains):
                raise ValueError(
                    f"'{table}' line {number}: fold2 {row['fold2']!r} must be train_<c> or test_<c> with centre c in "
                    f"0..{len(preset.domains) - 1}. Use FLamby's train_test_split.csv."
                )
            if not target.isdigit() or int(target) >= len(preset.classes):
                raise ValueError(
                    f"'{table}' line {number}: target {target!r} is out of range; Fed-ISIC2019 has "
                    f"{len(preset.classes)} classes, 0..{len(preset.classes) - 1}. Fix the line."
                )
            part = splits[preset.domains[int(centre)]][0 if split == "train" else 1]
            part.append((images / f"{row['image']}.jpg", int(target)))
    return index_of(root, "fed_isic2019_csv", preset.classes, splits)


# --- TerraIncognita: the ECCV'18 annotation files, split per location ------------------------------------

TERRA_ANNOTATION_FILES = (
    "cis_val_annotations.json",
    "train_annotations.json",
    "trans_val_annotations.json",
    "cis_test_annotations.json",
    "trans_test_annotations.json",
)
"""The annotation files the authors' script reads, in its order (the order sets the split)."""


def read_terra_annotations(root: Path, test_fraction: float = 0.2, split_seed: int = 17) -> DatasetIndex:
    """TerraIncognita from Caltech Camera Traps' ECCV'18 annotation files, split as the authors' script does.

    The files of :data:`TERRA_ANNOTATION_FILES` found in ``ROOT/eccv_18_annotation_files/`` are concatenated
    in that order. For every image (in that order) at one of the four locations, each of its annotations
    with one of the ten classes is a row ``(file, class)``. Each location's rows are shuffled by
    ``random.Random(split_seed)`` and the first ``int(0.8·n)`` are train. As the script copies rows into
    ``<split>/location_<l>/<class>/<file>``, a repeated row counts once per split; images come in that copy's
    ImageFolder order. Images are read from ``ROOT/eccv_18_all_images_sm/`` (or ``ROOT/images/…``).
    """
    preset = get_preset("terra_incognita")
    assert preset.classes is not None
    folder = root / "eccv_18_annotation_files"
    files = [folder / name for name in TERRA_ANNOTATION_FILES if (folder / name).is_file()]
    if not files:
        raise ValueError(f"'{folder}' holds none of the annotation files {list(TERRA_ANNOTATION_FILES)}; add them.")
    candidates = [root / "eccv_18_all_images_sm", root / "images" / "eccv_18_all_images_sm", root / "images"]
    images = next((p for p in candidates if p.is_dir()), None)
    if images is None:
        raise ValueError(f"'{root}' has annotation files but no images folder; put the images in '{candidates[0]}'.")
    merged: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            body = json.load(handle)
        for key in merged:
            merged[key].extend(body.get(key, []))
    category = {c["id"]: c["name"] for c in merged["categories"]}
    per_image: dict[object, list[str]] = {}
    for annotation in merged["annotations"]:
        per_image.setdefault(annotation["image_id"], []).append(category[annotation["category_id"]])
    wanted = {domain.removeprefix("location_"): domain for domain in preset.domains}
    rows: dict[str, list[tuple[str, str]]] = {domain: [] for domain in preset.domains}
    for image in merged["images"]:
        location = wanted.get(str(image["location"]))
        if location is not None:
            for name in per_image.get(image["id"], []):
                if name in preset.classes:
                    rows[location].append((name, image["file_name"]))
    label = {name: i for i, name in enumerate(preset.classes)}
    splits = {}
    for domain, found in rows.items():
        train, test = shuffled_split_indices(len(found), test_fraction, split_seed)
        splits[domain] = tuple(
            [(images / found[i][1], label[found[i][0]]) for i in sorted(part, key=lambda i: _copied_as(found[i]))]
            for part in (_unique(found, train), _unique(found, test))
        )
    return index_of(root, "terra_annotations", preset.classes, splits)


def _copied_as(row: tuple[str, str]) -> tuple[str, str]:
    """Where the authors' script copies a row: ``<class>/<file name>`` (ImageFolder sorts by these)."""
    return row[0], PurePosixPath(row[1]).name


def _unique(rows: list[tuple[str, str]], positions: list[int]) -> list[int]:
    """One position per distinct copy ``<class>/<file name>`` (the copy on disk keeps one file)."""
    first: dict[tuple[str, str], int] = {}
    for i in positions:
        first.setdefault(_copied_as(rows[i]), i)
    return list(first.values())
