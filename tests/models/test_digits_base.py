"""The offline base of builtin:digits: a tiny CLIP pre-trained on upright digits, quietly, reproducibly, upright only."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from lightning_score.classifier import CLIPClassifier
from lightning_score.data import DomainDataModule, digits
from lightning_score.models import digits_base, read_weights_metadata

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


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
    monkeypatch.setattr(digits_base.Trainer, "fit", lambda self, *a, **k: trainers.append(self))
    monkeypatch.setattr(digits_base, "save_clip_weights", lambda *a, **k: None)
    handlers = list(logging.getLogger().handlers)
    monkeypatch.setattr(digits_base.sys.stderr, "isatty", lambda: True)  # the bar draws only on a terminal
    with caplog.at_level(logging.WARNING):
        digits_base.build_digits_base("tiny-ViT-W64-L2", steps=3, batch_size=8, warmup_steps=1, progress_bar=True)
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


def test_base_pre_training_logs_progress_lines_when_not_on_a_terminal(
    lightning_score_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Output to a file (stderr is no terminal under pytest): a line every 10 % of the steps, not silence."""
    import logging
    import re
    import sys

    assert not sys.stderr.isatty()
    digits.materialise_rotated_digits()  # in the session cache, shared below
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(lightning_score_cache / "datasets")
    monkeypatch.setenv("LIGHTNING_SCORE_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="lightning_score.models.digits_base"):
        digits_base.build_digits_base("tiny-ViT-W64-L2", steps=20, batch_size=8, warmup_steps=1, progress_bar=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_score.models.digits_base"]
    pattern = r"pre-training the offline digits base \(tiny-ViT-W64-L2\): step (\d+)/20 \(\d+ %\), elapsed \d+:\d\d"
    steps = [re.fullmatch(pattern + r"(, ~\d+:\d\d left)?", line) for line in lines[:-1]]
    assert [int(m.group(1)) for m in steps if m] == list(range(2, 21, 2))
    assert all(m.group(2) for m in steps[:-1] if m)  # an estimate of what is left, until the end
    assert lines[-1].startswith("Offline digits base (tiny-ViT-W64-L2, 20 steps) pre-trained in ")


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
        path = digits_base.build_digits_base(
            "tiny-ViT-W64-L2", steps=4, batch_size=16, warmup_steps=1, progress_bar=False
        )
        assert path.parent == cache / "weights"
        fingerprints.append(read_weights_metadata(path)["fingerprint"])
    assert fingerprints[0] == fingerprints[1]


@pytest.mark.slow
def test_default_base_falls_with_rotation() -> None:
    """The offline default (about a minute to build): high zero-shot accuracy upright, near chance at 75 degrees."""
    weights = digits_base.build_digits_base(progress_bar=False)
    acc = _zero_shot(digits_base.BASE_DEFAULTS["model_name"], weights, list(digits.DOMAINS))
    assert acc["rot0"] > 0.9, acc
    assert acc["rot75"] < 0.35, acc
    assert acc["rot0"] > acc["rot30"] > acc["rot75"], acc
