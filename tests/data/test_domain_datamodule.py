from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_score.data import DomainDataModule

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


def test_layout_classnames_and_default_test_domains(root: Path) -> None:
    dm = _dm(root, train_domains=["beta"])
    dm.setup("fit")
    assert dm.domains == DOMAINS
    assert dm.class_folders == CLASSES and dm.classnames == ["big bird", "cat", "dog"]
    assert dm.train_domains == ["beta"] and dm.test_domains == ["alpha", "gamma"]


def test_split_is_80_20_seeded_disjoint_and_val_comes_from_training_domains_only(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha", "beta"], test_domains=["gamma", "alpha"], val_fraction=0.25)
    dm.setup("fit")
    n = len(CLASSES) * PER_CLASS
    for domain in DOMAINS:
        split = dm.split(domain)
        assert len(split.test) == n // 5
        assert len(split.val) == int((n - n // 5) * 0.25)
        assert sorted(split.fit + split.val + split.test) == list(range(n))
    # the test split ignores val_fraction and other settings, and is reproducible from the seed
    other = _dm(root, train_domains=["gamma"], val_fraction=0.0)
    assert other.split("alpha").test == dm.split("alpha").test
    assert _dm(root, split_seed=18).split("alpha").test != dm.split("alpha").test

    train_paths = {p for d in ["alpha", "beta"] for p, _ in dm.samples(d, "fit")}
    val_paths = {p for d in ["alpha", "beta"] for p, _ in dm.samples(d, "val")}
    loader_val = dm.val_dataloader()
    assert len(loader_val.dataset) == len(val_paths)
    assert all(p.parts[-3] in ("alpha", "beta") for p in val_paths)
    assert len(dm.train_dataloader().dataset) == len(train_paths)
    assert not train_paths & val_paths

    # a training domain listed as a test domain is tested on its held-out images only
    tests = dm.test_dataloader()
    assert [len(t.dataset) for t in tests] == [n // 5, n // 5]
    alpha_test = {p for p, _ in tests[1].dataset.samples}
    assert all(p.parts[-3] == "alpha" for p in alpha_test) and not alpha_test & (train_paths | val_paths)


def test_batches_carry_labels_matching_class_folders(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha"], batch_size=64)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32
    for image, label in zip(images, labels, strict=True):
        # the generator puts class index c in the red channel's offset 80*c
        assert round((float(image[0].mean()) * 255 - 20) / 80) == int(label)


def test_proxy_images_are_unlabelled_training_images(root: Path) -> None:
    dm = _dm(root, train_domains=["alpha", "beta"])
    dm.setup("fit")
    loader = dm.proxy_dataloader("beta", num_images=5)
    batches = list(loader)
    assert len(batches) == 1 and isinstance(batches[0], torch.Tensor) and batches[0].shape == (5, 3, 8, 8)
    proxy = {p for p, _ in loader.dataset.samples}
    assert proxy <= {p for p, _ in dm.samples("beta", "fit")}
    assert [p for p, _ in dm.proxy_dataloader("beta", num_images=5).dataset.samples] == [
        p for p, _ in loader.dataset.samples
    ]
    assert len(dm.proxy_dataloader("beta", num_images=1000).dataset) == len(dm.samples("beta", "fit"))


def test_transforms_come_from_the_lightning_module(root: Path) -> None:
    dm = DomainDataModule(str(root), train_domains=["alpha"], num_workers=0)
    with pytest.raises(ValueError, match="no image transforms"):
        dm.train_dataloader()
    module = SimpleNamespace(train_transform=_to_tensor, val_transform=lambda im: _to_tensor(im) * 0)
    dm.trainer = SimpleNamespace(lightning_module=module)
    dm.setup("fit")
    image, _ = dm.dataset("alpha", "test")[0]
    assert float(image.abs().sum()) == 0.0  # the module's val transform
    assert float(dm.dataset("alpha", "fit")[0][0].sum()) > 0


def test_missing_root_and_unknown_domain(tmp_path: Path, root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dm(tmp_path / "nowhere").setup("fit")
    with pytest.raises(ValueError, match=r"Domain 'delta' is not a folder.*\['alpha', 'beta', 'gamma'\]"):
        _dm(root, train_domains=["delta"]).setup("fit")
    with pytest.raises(ValueError, match="twice"):
        _dm(root, train_domains=["alpha", "alpha"])
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(root, val_fraction=1.0)


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
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken\.jpg'"):
        dm.setup("fit")
    lazy = _dm(root, test_domains=["beta"], verify_images=False)
    lazy.setup("test")
    split = next(s for s in ("fit", "val", "test") if bad in [p for p, _ in lazy.samples("beta", s)])
    index = [p for p, _ in lazy.samples("beta", split)].index(bad)
    with pytest.raises(ValueError, match=r"Cannot read image '.*broken\.jpg'"):
        lazy.dataset("beta", split)[index]


def test_too_small_domain(tmp_path: Path) -> None:
    root = _make_root(tmp_path / "tiny", domains=["a", "b"], classes=["x"], per_class=2)
    with pytest.raises(ValueError, match="too small"):
        _dm(root, train_domains=["a"]).setup("fit")


def test_presplit_layout_is_read_as_is(tmp_path: Path) -> None:
    root = tmp_path / "presplit"
    _make_root(root / "train", domains=["alpha", "beta"], per_class=6)
    _make_root(root / "test", domains=["alpha", "beta"], per_class=2)
    (root / "test" / "alpha" / "cat" / "000.png").rename(root / "test" / "alpha" / "cat" / "only_in_test.png")
    dm = _dm(root, train_domains=["alpha"], test_domains=["alpha", "beta"], val_fraction=0.0)
    dm.setup("fit")
    assert dm.domains == ["alpha", "beta"] and dm.class_folders == CLASSES
    for domain in ("alpha", "beta"):
        fit = {p for p, _ in dm.samples(domain, "fit")}
        test = {p for p, _ in dm.samples(domain, "test")}
        assert fit == {p for p in (root / "train" / domain).rglob("*.png")}
        assert test == {p for p in (root / "test" / domain).rglob("*.png")}
    labels = {p.name: y for p, y in dm.samples("alpha", "test")}
    assert labels["only_in_test.png"] == CLASSES.index("cat")
    assert [len(t.dataset) for t in dm.test_dataloader()] == [2 * len(CLASSES)] * 2
    # a validation part, when asked for, comes out of the train folder only
    carved = _dm(root, train_domains=["alpha"], val_fraction=0.25)
    val = {p for p, _ in carved.samples("alpha", "val")}
    assert len(val) == int(6 * len(CLASSES) * 0.25) and all(p.parts[-4] == "train" for p in val)


def test_presplit_layout_with_a_domain_missing_from_test(tmp_path: Path) -> None:
    root = tmp_path / "presplit"
    _make_root(root / "train", domains=["alpha", "beta"], per_class=2)
    _make_root(root / "test", domains=["alpha"], per_class=2)
    with pytest.raises(ValueError, match=r"different domains in train/ \(\['alpha', 'beta'\]\) and test/"):
        _dm(root).setup("fit")
