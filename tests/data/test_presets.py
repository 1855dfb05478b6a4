"""Dataset presets: the protocol table, detection from domain names, and each dataset on a generated folder."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import random_split
from torchvision.datasets import ImageFolder

from lightning_score.classifier import CLIPClassifier
from lightning_score.data import DomainDataModule, detect_preset, get_preset, list_presets
from lightning_score.models import load_templates
from tests.data.generate import image

# The SCORE paper's table (domains, classes, epochs) and its prompt sets, written out independently.
PAPER = {
    "pacs": (["art_painting", "cartoon", "photo", "sketch"], 7, 10, ["a photo of a {}.", "a photo of the {}."]),
    "office_home": (["Art", "Clipart", "Product", "Real_World"], 65, 10, "imagenet80"),
    "terra_incognita": (["location_38", "location_43", "location_46", "location_100"], 10, 15, "terra38"),
    "domainnet": (["clipart", "infograph", "painting", "quickdraw", "real", "sketch"], 345, 10, "imagenet80"),
    "nico_pp": (["autumn", "dim", "grass", "outdoor", "rock", "water"], 60, 15, "imagenet80"),
    "imagenet_r": (15, 200, 10, "imagenet80"),
    "fed_isic2019": (6, 8, 20, ["This is dermatoscopy of {}.", "This is dermoscopy of {}."]),
    "retina": (
        ["aptos2019", "DDR", "idrid_retina", "messidor2"],
        5,
        20,
        [
            "a fundus image with {}",
            "a retina photograph showing {}",
            "retinal scan indicating {}",
            "an eye fundus with {}",
        ],
    ),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_each_preset_is_the_papers_protocol(name: str) -> None:
    domains, classes, epochs, prompts = PAPER[name]
    preset = get_preset(name)
    assert (len(preset.domains) if isinstance(domains, int) else list(preset.domains)) == domains
    assert (preset.num_classes, preset.epochs, preset.in_paper) == (classes, epochs, True)
    templates = load_templates(preset.templates)
    if prompts == "imagenet80":
        assert preset.templates == "imagenet" and len(templates) == 80 and templates[0] == "a bad photo of a {}."
    elif prompts == "terra38":
        assert len(templates) == 38 and set(templates) < set(load_templates("imagenet"))
        assert not any(word in t for t in templates for word in ("sketch", "painting", "cartoon", "drawing"))
    else:
        assert templates == prompts
    medical = name in ("fed_isic2019", "retina")
    assert dict(preset.score_options) == ({"divide_by_tasks": False} if medical else {})
    assert load_templates(name) == templates  # a preset's name is also its prompt set's name


def test_vlcs_is_an_extra_with_the_natural_image_prompts() -> None:
    vlcs = get_preset("VLCS")
    assert not vlcs.in_paper and vlcs.num_classes == 5 and vlcs.templates == "imagenet"
    assert set(list_presets()) == {*PAPER, "vlcs"}
    assert get_preset("NICO++").name == "nico_pp" and get_preset("ImageNet-R").name == "imagenet_r"


def test_detect_preset_from_domain_folders() -> None:
    assert detect_preset(["art_painting", "cartoon", "photo", "sketch"]).name == "pacs"
    assert detect_preset(["art_painting", "photo"]).name == "pacs"  # a dataset with domains left out
    assert detect_preset(["Art", "Clipart", "Product", "Real World"]).name == "office_home"  # DomainBed's spelling
    assert detect_preset(["aptos2019", "DDR", "idrid", "messidor2"]).name == "retina"
    assert detect_preset(["cartoon", "sketch"]) is None  # PACS or ImageNet-R: ambiguous
    assert detect_preset(["cartoon", "sketch", "photo"]).name == "pacs"
    assert detect_preset(["sketch"]) is None and detect_preset(["rot0", "rot15"]) is None


def _paper_layout(root: Path, name: str) -> Path:
    """A tiny folder of the dataset in a layout that gives the paper's split (2 classes, 5 images per domain)."""
    preset = get_preset(name)
    layout = "presplit" if "presplit" in preset.paper_layouts and name != "office_home" else "unsplit"
    for domain in preset.domains:
        for c in ("class_a", "class_b"):
            for i in range(5):
                if layout == "unsplit":
                    image(root / domain / c / f"{i}.png")
                else:
                    image(root / ("train" if i < 4 else "test") / domain / c / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ["office_home", "nico_pp", "vlcs", "retina", "domainnet", "terra_incognita"])
def test_a_dataset_in_a_paper_layout_gets_its_preset_without_a_warning(tmp_path: Path, name: str) -> None:
    root = _paper_layout(tmp_path / name, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = DomainDataModule(str(root), num_workers=0)
        assert dm.preset is get_preset(name) and dm.default_templates == get_preset(name).templates
    # templates="auto" resolves to the authors' set through the datamodule (the classifier's own code path)
    fake = SimpleNamespace(templates="auto", _datamodule=lambda: dm)
    fake._domain_names = lambda: CLIPClassifier._domain_names(fake)  # type: ignore[arg-type]
    assert CLIPClassifier.resolve_templates(fake) == get_preset(name).templates


@pytest.mark.parametrize(("name", "fix"), [("terra_incognita", "eccv_18_annotation_files"), ("retina", "notebook")])
def test_a_dataset_whose_paper_split_is_not_random_split_warns_when_unsplit(
    tmp_path: Path, name: str, fix: str
) -> None:
    preset = get_preset(name)
    for domain in preset.domains:
        for i in range(5):
            image(tmp_path / domain / "x" / f"{i}.png")
    with pytest.warns(UserWarning, match=rf"looks like {preset.title}, read as layout 'unsplit'.*{fix}"):
        _ = DomainDataModule(str(tmp_path), num_workers=0).index


def test_imagenet_r_in_its_own_layout_is_split_once_over_all_images(tmp_path: Path) -> None:
    root = tmp_path / "imagenet-r"
    wnids = {"n01443537": "goldfish", "n01833805": "hummingbird", "n02007558": "flamingo"}
    (root).mkdir()
    (root / "README.txt").write_text("ImageNet-R\n" + "".join(f"{w} {n}\n" for w, n in wnids.items()))
    for k, wnid in enumerate(wnids):
        for domain in ("art", "deviantart", "sketch", "toy"):
            for i in range(3 + k):
                image(root / wnid / f"{domain}_{i}.jpg")
    dm = DomainDataModule(str(root), num_workers=0)
    assert dm.layout == "unsplit_filename_domains" and dm.domains == ["art", "deviantart", "sketch", "toy"]
    assert dm.class_folders == ["flamingo", "goldfish", "hummingbird"]
    # the authors: rename the wnid folders by README.txt, ImageFolder over everything, one random_split (seed 17)
    renamed = tmp_path / "renamed"
    for wnid, name in wnids.items():
        shutil.copytree(root / wnid, renamed / name)
    reference = ImageFolder(str(renamed))
    n = len(reference)
    train, test = random_split(reference, [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(17))
    for split, part in (("train", train), ("test", test)):
        for domain in dm.domains:
            # their subset for a domain: the files whose name starts with it, in ImageFolder order
            expected = [
                (reference.classes[reference.imgs[i][1]], Path(reference.imgs[i][0]).name, reference.imgs[i][1])
                for i in sorted(part.indices)
                if Path(reference.imgs[i][0]).name.startswith(domain + "_")
            ]
            got = [(dm.class_folders[y], p.name, y) for p, y in dm.samples(domain, split)]
            assert got == expected


def test_imagenet_r_presplit_by_the_authors_is_read_as_is(tmp_path: Path) -> None:
    root = tmp_path / "imagenet-r"
    for split, count in (("train", 4), ("test", 1)):
        for c in ("goldfish", "tabby_cat"):
            for domain in ("cartoon", "origami"):
                for i in range(count):
                    image(root / split / c / f"{domain}_{split}{i}.jpg")
    dm = DomainDataModule(str(root), num_workers=0)
    assert dm.layout == "presplit_filename_domains" and dm.domains == ["cartoon", "origami"]
    assert dm.classnames == ["goldfish", "tabby cat"]
    assert {p.name for p, _ in dm.samples("origami", "test")} == {"origami_test0.jpg"}
    assert len(dm.samples("cartoon", "train")) == 8
    image(root / "train" / "goldfish" / "noprefix.jpg")
    with pytest.raises(ValueError, match=r"'.*noprefix\.jpg' .* has no domain prefix"):
        _ = DomainDataModule(str(root), num_workers=0).domains
