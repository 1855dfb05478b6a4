from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import random_split
from torchvision.datasets import ImageFolder

from lightning_score.data import DomainDataModule
from tests.data.generate import image

DOMAINS = ["alpha", "beta", "gamma"]
CLASSES = ["big_bird", "cat", "dog"]
PER_CLASS = 10


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0


def _make_root(root: Path, domains=DOMAINS, classes=CLASSES, per_class=PER_CLASS) -> Path:
    rng = np.random.RandomState(0)
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.randint(0, 40, (8, 8, 3)) + np.array([80 * c, 60 * d, i], dtype=np.int64)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return _make_root(tmp_path / "data")


def _dm(root: Path, **kwargs) -> DomainDataModule:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("train_transform", _to_tensor)
    kwargs.setdefault("val_transform", _to_tensor)
    return DomainDataModule(str(root), **kwargs)


def _paths(samples) -> list[Path]:
    return [p for p, _ in samples]


def test_layout_classnames_and_default_test_domains(root: Path) -> None:
    dm = _dm(root, train_domains=["beta"])
    dm.setup("fit")
    assert dm.layout == "unsplit" and dm.domains == DOMAINS and dm.preset is None and dm.default_templates is None
    assert dm.class_folders == CLASSES and dm.classnames == ["big bird", "cat", "dog"]
    assert dm.train_domains == ["beta"] and dm.test_domains == ["alpha", "gamma"]


def test_an_unsplit_folder_is_split_exactly_as_the_authors_random_split(tmp_path: Path) -> None:
    root = tmp_path / "unsplit"
    # ImageFolder's order has corners: a nested folder, an upper-case extension, files it ignores
    for c, name in enumerate(["Alarm_Clock", "TV", "Table", "bike"]):
        for i in range(7 + 2 * c):
            image(root / "Real World" / name / f"{i:02d}.jpg")
    image(root / "Real World" / "Table" / "nested" / "a.PNG")
    image(root / "Real World" / "TV" / "zz.gif")
    (root / "Real World" / "TV" / "notes.txt").write_text("not an image")
    for name in ["Alarm_Clock", "TV", "Table", "bike"]:
        image(root / "Art" / name / "x.jpg")
        image(root / "Art" / name / "y.jpg")

    dm = _dm(root)
    reference = ImageFolder(str(root / "Real World"))
    n = len(reference)
    assert n == sum(7 + 2 * c for c in range(4)) + 1
    train, test = random_split(reference, [int(0.8 * n), n - int(0.8 * n)], generator=torch.Generator().manual_seed(17))
    expected_train = [(Path(reference.imgs[i][0]), reference.imgs[i][1]) for i in sorted(train.indices)]
    expected_test = [(Path(reference.imgs[i][0]), reference.imgs[i][1]) for i in sorted(test.indices)]
    assert dm.samples("Real World", "train") == expected_train
    assert dm.samples("Real World", "test") == expected_test
    assert dm.class_folders == reference.classes == ["Alarm_Clock", "TV", "Table", "bike"]
    # another seed, another split; the split never depends on which domains train
    other = _dm(root, split_seed=18, train_domains=["Art"])
    assert set(_paths(other.samples("Real World", "test"))) != set(_paths(expected_test))


def test_experts_train_on_their_whole_train_split_and_sources_validate_on_their_test_split(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha", "beta"], test_domains=["gamma", "alpha"])
    dm.setup("fit")
    n = len(CLASSES) * PER_CLASS
    for domain in DOMAINS:
        split = dm.split(domain)
        assert len(split.fit) == int(0.8 * n) and len(split.test) == n - int(0.8 * n)
        assert dm.samples(domain, "fit") == dm.samples(domain, "train")
        assert dm.samples(domain, "val") == dm.samples(domain, "test")  # held out, never trained on
        assert not set(_paths(dm.samples(domain, "fit"))) & set(_paths(dm.samples(domain, "val")))
    assert len(dm.train_dataloader().dataset) == 2 * int(0.8 * n)
    val = dm.val_dataloader()
    val_paths = {p for part in val.dataset.datasets for p in _paths(part.samples)}
    assert val_paths == set(_paths(dm.samples("alpha", "test") + dm.samples("beta", "test")))
    tests = dm.test_dataloader()
    assert [len(t.dataset) for t in tests] == [n - int(0.8 * n)] * 2
    assert _paths(tests[1].dataset.samples) == _paths(dm.samples("alpha", "test"))


def test_val_fraction_carves_validation_out_of_the_train_split(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha"], val_fraction=0.25)
    dm.setup("fit")
    train = dm.samples("alpha", "train")
    fit, val = dm.samples("alpha", "fit"), dm.samples("alpha", "val")
    assert len(val) == int(len(train) * 0.25) and sorted(fit + val) == sorted(train) and not set(fit) & set(val)
    assert dm.samples("alpha", "test") == _dm(root).samples("alpha", "test")  # the test split never moves
    assert len(dm.train_dataloader().dataset) == len(fit) and len(dm.val_dataloader().dataset) == len(val)


def test_batches_carry_labels_matching_class_folders(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha"], batch_size=64)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32
    for image_, label in zip(images, labels, strict=True):
        # the generator puts class index c in the red channel's offset 80*c
        assert round((float(image_[0].mean()) * 255 - 20) / 80) == int(label)


def test_proxy_images_are_a_fixed_sample_of_a_sources_validation_split(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha", "beta"], test_domains=["gamma"], split_seed=17)
    dm.setup("fit")
    loader = dm.proxy_dataloader("beta", num_images=5)
    batches = list(loader)
    assert len(batches) == 1 and isinstance(batches[0], torch.Tensor) and batches[0].shape == (5, 3, 8, 8)
    proxy = _paths(loader.dataset.samples)
    val = _paths(dm.samples("beta", "val"))
    expected = [
        val[i] for i in sorted(torch.randperm(len(val), generator=torch.Generator().manual_seed(17))[:5].tolist())
    ]
    assert proxy == expected and not set(proxy) & set(_paths(dm.samples("beta", "fit")))
    assert _paths(dm.proxy_dataloader("beta", num_images=5).dataset.samples) == proxy
    assert len(dm.proxy_dataloader("beta", num_images=1000).dataset) == len(val)
    with pytest.raises(ValueError, match="'gamma' is a test domain and not a training domain"):
        dm.proxy_dataloader("gamma", num_images=5)


def test_transforms_come_from_the_lightning_module(root: Path) -> None:
    dm = DomainDataModule(str(root), train_domains=["alpha"], num_workers=0)
    with pytest.raises(ValueError, match="no image transforms"):
        dm.train_dataloader()
    module = SimpleNamespace(train_transform=_to_tensor, val_transform=lambda im: _to_tensor(im) * 0)
    dm.trainer = SimpleNamespace(lightning_module=module)
    dm.setup("fit")
    image_, _ = dm.dataset("alpha", "test")[0]
    assert float(image_.abs().sum()) == 0.0  # the module's val transform
    assert float(dm.dataset("alpha", "fit")[0][0].sum()) > 0


def test_missing_root_unknown_domain_and_bad_arguments(tmp_path: Path, root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(tmp_path / "nowhere").setup("fit")
    with pytest.raises(ValueError, match=r"Domain 'delta' is not a domain of .*\['alpha', 'beta', 'gamma'\]"):
        _dm(root, train_domains=["delta"]).setup("fit")
    with pytest.raises(ValueError, match="twice"):
        _dm(root, train_domains=["alpha", "alpha"])
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(root, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"Unknown dataset preset 'pacz'.*'pacs'"):
        _dm(root, preset="pacz")
    with pytest.raises(ValueError, match="split must be one of"):
        _dm(root).samples("alpha", "validation")


def test_domain_without_images(root: Path) -> None:
    for name in CLASSES:
        (root / "empty" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Domain folder '.*empty' has no images"):
        _dm(root).setup("fit")


def test_class_mismatch_names_the_folders_and_the_classes(root: Path) -> None:
    (root / "gamma" / "cat").rename(root / "gamma" / "horse")
    with pytest.raises(ValueError, match=r"'.*gamma' has \['horse'\].*lacks \['cat'\]"):
        _dm(root).setup("fit")


def test_unreadable_image_is_named(root: Path) -> None:
    bad = root / "beta" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    dm = _dm(root, train_domains=["alpha"], test_domains=["beta"])
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken\.jpg' \(listed by domain 'beta'"):
        dm.setup("fit")
    lazy = _dm(root, test_domains=["beta"], verify_images=False)
    lazy.setup("test")
    split = next(s for s in ("train", "test") if bad in _paths(lazy.samples("beta", s)))
    index = _paths(lazy.samples("beta", split)).index(bad)
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken\.jpg'"):
        lazy.dataset("beta", split)[index]


def test_a_domain_too_small_to_split(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "tiny", domains=["a", "b"], classes=["x"], per_class=1)
    with pytest.raises(ValueError, match=r"Domain 'a' of .* has no train images"):
        _dm(root, train_domains=["a"]).setup("fit")


def test_presplit_layout_is_read_as_is(tmp_path: Path) -> None:
    root = tmp_path / "presplit"
    _make_root(root / "train", domains=["alpha", "beta"], per_class=6)
    _make_root(root / "test", domains=["alpha", "beta"], per_class=2)
    (root / "test" / "alpha" / "cat" / "000.png").rename(root / "test" / "alpha" / "cat" / "only_in_test.png")
    dm = _dm(root, train_domains=["alpha"], test_domains=["alpha", "beta"])
    dm.setup("fit")
    assert dm.layout == "presplit" and dm.domains == ["alpha", "beta"] and dm.class_folders == CLASSES
    for domain in ("alpha", "beta"):
        assert set(_paths(dm.samples(domain, "fit"))) == set((root / "train" / domain).rglob("*.png"))
        assert set(_paths(dm.samples(domain, "test"))) == set((root / "test" / domain).rglob("*.png"))
        assert dm.samples(domain, "val") == dm.samples(domain, "test")
    labels = {p.name: y for p, y in dm.samples("alpha", "test")}
    assert labels["only_in_test.png"] == CLASSES.index("cat")
    assert [len(t.dataset) for t in dm.test_dataloader()] == [2 * len(CLASSES)] * 2
    # a validation part, when asked for, comes out of the train folder only
    carved = _dm(root, train_domains=["alpha"], val_fraction=0.25)
    val = _paths(carved.samples("alpha", "val"))
    assert len(val) == int(6 * len(CLASSES) * 0.25) and all(p.parts[-4] == "train" for p in val)


def test_presplit_layout_with_a_domain_missing_from_test(tmp_path: Path) -> None:
    root = tmp_path / "presplit"
    _make_root(root / "train", domains=["alpha", "beta"], per_class=2)
    _make_root(root / "test", domains=["alpha"], per_class=2)
    with pytest.raises(ValueError, match=r"different domains in train/ .* \['beta'\] only in train/.*test/<domain>"):
        _dm(root).setup("fit")


def test_presplit_layout_with_a_class_missing_from_one_split_keeps_one_label_space(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "presplit"
    _make_root(root / "train", domains=["alpha", "beta"], per_class=2)
    _make_root(root / "test", domains=["alpha", "beta"], classes=["cat", "dog"], per_class=2)
    dm = _dm(root)
    assert dm.class_folders == CLASSES
    assert {y for _, y in dm.samples("beta", "test")} == {1, 2}
    assert "has no folder for classes ['big_bird']" in caplog.text


def test_a_known_dataset_gets_its_preset_and_a_warning_when_its_split_is_not_the_papers(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "PACS", domains=["art_painting", "cartoon", "photo", "sketch"], per_class=2)
    dm = _dm(root)
    with pytest.warns(UserWarning, match=r"looks like PACS.*official <domain>_train_kfold.txt"):
        assert dm.preset.name == "pacs"
    assert dm.default_templates == "pacs"
    assert _dm(root, preset="none").default_templates is None
    office = _make_root(tmp_path / "OfficeHome", domains=["Art", "Clipart", "Product", "Real World"], per_class=2)
    assert _dm(office).default_templates == "imagenet"  # the unsplit folder is the paper's own split: no warning
    assert _dm(office, preset="vlcs").preset.name == "vlcs"
