from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from lightning_score.data import DomainDataModule, digits


def _ids(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_benchmark_layout_pool_and_caching(lightning_score_cache: Path) -> None:
    root = digits.materialise_rotated_digits()
    assert root.parent.parent.parent == lightning_score_cache
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]  # the pre-split layout
    parts = digits.digit_partition()
    for split, per_digit in (("train", digits.TRAIN_RENDERINGS), ("test", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(digits.DOMAINS)
        files = _ids(root / split / "rot0")
        assert len(files) == len(parts[split]) * per_digit and {f.split("/")[0] for f in files} == set(
            digits.DIGIT_NAMES
        )
        for domain in digits.DOMAINS[1:]:
            assert _ids(root / split / domain) == files  # the same digits, the same file names, in every domain
    assert len(_ids(root / "test" / "rot45")) >= 1000  # a cell's 95 % interval of about ±2-3 points
    pool = {int(Path(f).stem) for f in _ids(root.parent / "pool")}
    assert pool == set(parts["pool"].tolist()) and len(pool) == digits.POOL_SIZE
    with Image.open(root / "test" / "rot45" / _ids(root / "test" / "rot45")[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    first = root / "test" / "rot0" / _ids(root / "test" / "rot0")[0]
    stamp = first.stat().st_mtime_ns
    assert digits.materialise_rotated_digits() == root
    assert first.stat().st_mtime_ns == stamp  # cached, not rewritten


def test_pool_test_and_train_digits_are_disjoint() -> None:
    parts = digits.digit_partition()
    assert len(parts["pool"]) + len(parts["test"]) + len(parts["train"]) == 1797
    assert not set(parts["pool"]) & set(parts["test"]) and not set(parts["pool"]) & set(parts["train"])
    assert not set(parts["test"]) & set(parts["train"]) and len(parts["test"]) == digits.TEST_DIGITS


def test_every_rendering_is_its_own_draw_and_rotated_by_the_domain_angle() -> None:
    root = digits.materialise_rotated_digits()
    raw = load_digits().images
    sample = next((root / "test" / "rot0" / "seven").glob("*.png"))
    index = int(sample.stem)
    for domain_index, (angle, domain) in enumerate(zip(digits.ROTATIONS, digits.DOMAINS, strict=True)):
        jitter = digits.rendering_jitter("test", domain_index, index, 0)
        with Image.open(root / "test" / domain / "seven" / sample.name) as image:
            assert np.array_equal(np.asarray(image), np.asarray(digits.render_digit(raw[index], angle, **jitter)))
    draws = [digits.rendering_jitter(split, d, i, k) for split in ("train", "test") for d in range(6)
             for i in range(40) for k in range(2)]  # fmt: skip
    assert {d["thickness"] for d in draws} == {-1, 0, 1} and {d["scale"] * 24 for d in draws} == set(range(20, 27))
    assert {d["shift"] for d in draws} == {(x, y) for x in range(-2, 3) for y in range(-2, 3)}
    assert digits.rendering_jitter("test", 2, 7, 0) == digits.rendering_jitter("test", 2, 7, 0)  # reproducible
    assert digits.rendering_jitter("test", 2, 7, 0) != digits.rendering_jitter("train", 2, 7, 0)
    plain = np.asarray(digits.render_digit(raw[index], 0), dtype=int)
    thick = np.asarray(digits.render_digit(raw[index], 0, thickness=1), dtype=int)
    thin = np.asarray(digits.render_digit(raw[index], 0, thickness=-1), dtype=int)
    assert thick.sum() > plain.sum() > thin.sum()


def test_no_test_image_is_a_training_image_and_no_digit_crosses_splits() -> None:
    dm = DomainDataModule("builtin:digits", train_domains=list(digits.DOMAINS), test_domains=list(digits.DOMAINS))
    assert dm.layout == "presplit" and dm.default_templates == "digits"

    def digit(path: Path) -> int:
        return int(path.stem.split("-")[0])

    test_ids = {d: {digit(p) for p, _ in dm.samples(d, "test")} for d in digits.DOMAINS}
    train_ids = {d: {digit(p) for p, _ in dm.samples(d, "train")} for d in digits.DOMAINS}
    for a in digits.DOMAINS:
        assert len(test_ids[a]) == len(dm.samples(a, "test")) == digits.TEST_DIGITS  # one image per test digit
        for b in digits.DOMAINS:
            assert test_ids[a] == test_ids[b] and not train_ids[a] & test_ids[b]
    pixels = set()
    for domain in ("rot0", "rot45"):
        for path, _ in dm.samples(domain, "train"):
            with Image.open(path) as image:
                pixels.add(np.asarray(image).tobytes())
        for path, _ in dm.samples(domain, "test"):
            with Image.open(path) as image:
                assert np.asarray(image).tobytes() not in pixels
