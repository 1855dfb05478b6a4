"""A few images of three rotated-digits domains, in the pre-split layout, for quick end-to-end studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lightning_score.study import ExpertSettings, Row, run_study
from tests.experts import QUICK_BASE

DOMAINS = ["rot0", "rot30", "rot60"]
TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 5
QUICK_EXPERT = ExpertSettings(lr=1e-3, warmup_steps=1, max_steps=6, max_epochs=None, batch_size=32)
ROWS = [
    Row("SCORE"),
    Row("TIES", method="ties"),
    Row("ESM", method="esm"),
    Row("Zero-shot", mode="zeroshot"),
    Row("Logit ensemble", mode="ensemble"),
    Row("Pooled fine-tune (ERM)", mode="pooled"),
    Row("Expert (target domain)", mode="expert"),
]


@pytest.fixture(scope="session")
def mini_digits(lightning_score_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first images of each class of rot0, rot30, rot60 (train and test), copied from the built-in benchmark."""
    from lightning_score.data import digits

    source = digits.materialise_rotated_digits()
    root = tmp_path_factory.mktemp("mini-digits")
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for domain in DOMAINS:
            for folder in sorted((source / split / domain).iterdir()):
                target = root / split / domain / folder.name
                target.mkdir(parents=True)
                for image in sorted(folder.glob("*.png"))[:count]:
                    shutil.copy(image, target / image.name)
    return root


def quick_study(output_dir: Path, root: Path, base: Path, **overrides: object) -> list[dict]:
    """A study of the mini data: the quick base, a few steps, two targets, one seed unless told."""
    settings = dict(output_dir=str(output_dir), model_name=QUICK_BASE["model_name"], pretrained=str(base),
                    templates="digits", root=str(root), targets=["rot30", "rot60"], expert=QUICK_EXPERT, rows=ROWS,
                    proxy_images=4, alpha_images=10, bootstrap=200, accelerator="cpu", eval_batch_size=64)  # fmt: skip
    settings.update(overrides)
    return run_study(**settings)
