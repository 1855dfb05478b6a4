from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from lightning_score.classifier import CLIPClassifier
from lightning_score.data import DomainDataModule, digits
from lightning_score.models import read_weights_metadata
from lightning_score.models.cache import atomic_publish_dir

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


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


def test_base_build_is_quiet_about_its_random_start_and_counts_one_epoch(
    lightning_score_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No "initialized randomly" warning for the deliberate random start; the bar reads "Epoch 0/0", not "0/-2"."""
    import logging

    from lightning.pytorch.callbacks import RichProgressBar

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(lightning_score_cache / "datasets")
    monkeypatch.setenv("LIGHTNING_SCORE_CACHE", str(cache))
    trainers = []
    monkeypatch.setattr(digits.Trainer, "fit", lambda self, *a, **k: trainers.append(self))
    monkeypatch.setattr(digits, "save_clip_weights", lambda *a, **k: None)
    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.WARNING):
        digits.build_digits_base("tiny-ViT-W64-L2", steps=3, batch_size=8, warmup_steps=1, progress_bar=True)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert logging.getLogger().handlers == handlers  # nothing configured on the root logger
    (trainer,) = trainers
    assert trainer.max_steps == 3 and trainer.max_epochs == 1
    bar = next(c for c in trainer.callbacks if isinstance(c, RichProgressBar))
    bar._trainer = trainer
    assert bar._get_train_description(0).strip() == "Epoch 0/0"
    with caplog.at_level(logging.WARNING):  # open_clip still warns when a random model is built elsewhere
        from lightning_score.models import build_clip

        build_clip("tiny-ViT-W64-L2", None)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def _zero_shot(model_name: str, weights: Path | str, domains: list[str]) -> dict[str, float]:
    dm = DomainDataModule("builtin:digits", test_domains=domains, batch_size=512, num_workers=0)
    results = L.Trainer(**QUIET).test(CLIPClassifier(model_name, str(weights)), datamodule=dm, verbose=False)
    return {d: results[0][f"test/{d}/acc"] for d in domains}


def test_quick_base_is_upright_only(quick_base: Path, quick_base_settings: dict) -> None:
    acc = _zero_shot(quick_base_settings["model_name"], quick_base, ["rot0", "rot75"])
    assert acc["rot0"] > 0.5, acc  # chance is 0.1
    assert acc["rot0"] > acc["rot75"] + 0.3, acc


def test_base_build_is_reproducible(
    lightning_score_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fingerprints = []
    for name in ("a", "b"):
        cache = tmp_path / name
        cache.mkdir()
        (cache / "datasets").symlink_to(lightning_score_cache / "datasets")  # reuse the materialised digits
        monkeypatch.setenv("LIGHTNING_SCORE_CACHE", str(cache))
        path = digits.build_digits_base("tiny-ViT-W64-L2", steps=4, batch_size=16, warmup_steps=1, progress_bar=False)
        assert path.parent == cache / "weights"
        fingerprints.append(read_weights_metadata(path)["fingerprint"])
    assert fingerprints[0] == fingerprints[1]


def test_a_folder_published_by_a_racing_process_wins(tmp_path: Path) -> None:
    final = tmp_path / "artefact"

    def build(scratch: Path) -> None:
        (scratch / "mine.txt").write_text("loser")
        final.mkdir()  # another process finishes first
        (final / "theirs.txt").write_text("winner")

    assert atomic_publish_dir(final, build) == final
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]  # the losing copy is removed


@pytest.mark.slow
def test_default_base_falls_with_rotation() -> None:
    """The offline default (about a minute to build): high zero-shot accuracy upright, near chance at 75 degrees."""
    weights = digits.build_digits_base(progress_bar=False)
    acc = _zero_shot(digits.BASE_DEFAULTS["model_name"], weights, list(digits.DOMAINS))
    assert acc["rot0"] > 0.9, acc
    assert acc["rot75"] < 0.35, acc
    assert acc["rot0"] > acc["rot30"] > acc["rot75"], acc
