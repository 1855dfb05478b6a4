from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from lightning_score.classifier import BalancedAccuracy, CLIPClassifier
from lightning_score.data import DomainDataModule
from lightning_score.expert import CLIPExpert
from lightning_score.task_vector import state_dict_fingerprint
from tests.experts import QUICK_BASE

MODEL = QUICK_BASE["model_name"]
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


def _digits(**kwargs) -> DomainDataModule:
    kwargs.setdefault("batch_size", 64)
    return DomainDataModule("builtin:digits", num_workers=0, **kwargs)


@pytest.fixture(scope="module")
def fitted(quick_base: Path) -> dict:
    """A quick expert on rot45, with what it looked like before fit and the base model's score."""
    base = L.Trainer(**QUIET).test(
        CLIPClassifier(MODEL, str(quick_base)), datamodule=_digits(test_domains=["rot45"]), verbose=False
    )[0]
    expert = CLIPExpert(MODEL, str(quick_base), lr=1e-3, warmup_steps=3)
    before = {k: v.clone() for k, v in expert.clip.state_dict().items()}
    datamodule = _digits(train_domains=["rot45"], test_domains=["rot45", "rot0"])
    trainer = L.Trainer(max_steps=40, gradient_clip_val=1.0, num_sanity_val_steps=0, **QUIET)
    trainer.fit(expert, datamodule=datamodule)
    fit_metrics = dict(trainer.callback_metrics)
    results = trainer.test(expert, datamodule=datamodule, verbose=False)[0]
    return {
        "expert": expert,
        "trainer": trainer,
        "before": before,
        "base": base,
        "results": results,
        "fit": fit_metrics,
    }


def test_expert_beats_the_base_on_its_own_domain(fitted: dict) -> None:
    base, expert = fitted["base"]["test/rot45/acc"], fitted["results"]["test/rot45/acc"]
    assert expert > base + 0.2, (base, expert)  # 40 steps: 0.16 -> 0.45 on the jittered digits
    keys = {"test/rot45/acc", "test/rot45/balanced_acc", "test/rot0/acc", "test/rot0/balanced_acc"}
    assert keys <= set(fitted["results"])
    assert {"val/acc", "val/balanced_acc", "val/loss", "train/loss"} <= set(fitted["fit"])


def test_only_the_image_encoder_changes(fitted: dict, quick_base: Path) -> None:
    expert, before = fitted["expert"], fitted["before"]
    after = expert.clip.state_dict()
    text_keys = [k for k in before if not k.startswith("visual.")]
    assert "logit_scale" in text_keys and "token_embedding.weight" in text_keys
    assert all(torch.equal(before[k], after[k]) for k in text_keys)
    changed = [k for k in before if k.startswith("visual.") and not torch.equal(before[k], after[k])]
    assert len(changed) == len([k for k in before if k.startswith("visual.")])  # the whole encoder trains

    optimised = {id(p) for group in fitted["trainer"].optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in expert.image_encoder.parameters()}
    assert fitted["trainer"].optimizers[0].defaults["weight_decay"] == 0.1

    fresh = CLIPClassifier(MODEL, str(quick_base))
    fresh.trainer = None
    head = fresh.build_head(expert.head.classnames, "digits")
    assert torch.equal(head.weight, expert.head.weight)  # the head is bit-identical to one built from θ₀
    pretrained_visual = {k[len("visual.") :]: v for k, v in before.items() if k.startswith("visual.")}
    assert expert.pretrained_fingerprint == state_dict_fingerprint(pretrained_visual)
    assert expert.base_model == f"{MODEL}/{Path(quick_base).name}"
    assert set(expert.image_encoder.state_dict()) == set(pretrained_visual)
    assert {"conv1.weight", "proj", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight"} <= set(
        pretrained_visual
    )


def test_checkpoint_round_trip_restores_head_and_weights(fitted: dict, tmp_path: Path) -> None:
    expert = fitted["expert"]
    fitted["trainer"].save_checkpoint(tmp_path / "expert.ckpt")
    loaded = CLIPExpert.load_from_checkpoint(tmp_path / "expert.ckpt")
    assert loaded.head is not None and loaded.head.classnames == expert.head.classnames
    assert loaded.hparams.lr == 1e-3 and loaded.template_set == "digits"
    images = torch.randn(3, 3, 32, 32)
    expert.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expert(images.to(expert.device)).cpu())


def test_test_metrics_equal_a_direct_computation(quick_base: Path) -> None:
    datamodule = _digits(test_domains=["rot0", "rot30"])
    model = CLIPClassifier(MODEL, str(quick_base), templates="auto")
    results = L.Trainer(**QUIET).test(model, datamodule=datamodule, verbose=False)[0]
    assert model.template_set == "digits"
    assert list(model.head.parameters()) == [] and not any(p.requires_grad for p in model.parameters())
    model.eval()
    for domain, loader in zip(datamodule.test_domains, datamodule.test_dataloader(), strict=True):
        preds, labels = [], []
        with torch.no_grad():
            for images, y in loader:
                preds.append(model(images).argmax(-1))
                labels.append(y)
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        assert results[f"test/{domain}/acc"] == pytest.approx(float((p == y).mean()), abs=1e-6)
        assert results[f"test/{domain}/balanced_acc"] == pytest.approx(balanced_accuracy_score(y, p), abs=1e-6)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_ignores_absent_classes_like_sklearn() -> None:
    rng = np.random.RandomState(0)
    for _ in range(20):
        y = rng.randint(0, 4, size=30)  # class 4 never occurs but may be predicted
        p = np.where(rng.rand(30) < 0.6, y, rng.randint(0, 5, size=30))
        metric = BalancedAccuracy(num_classes=5)
        metric.update(torch.from_numpy(p[:17]), torch.from_numpy(y[:17]))
        metric.update(torch.from_numpy(p[17:]), torch.from_numpy(y[17:]))
        assert float(metric.compute()) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-6)


def test_head_class_list_must_agree_with_the_datamodule(quick_base: Path) -> None:
    datamodule = _digits(test_domains=["rot0"])
    model = CLIPClassifier(MODEL, str(quick_base), templates="digits", classnames=list(reversed(datamodule.classnames)))
    with pytest.raises(ValueError, match="must agree"):
        L.Trainer(**QUIET).test(model, datamodule=datamodule, verbose=False)


def test_gradient_checkpointing_gives_the_same_gradients(quick_base: Path) -> None:
    classnames = _digits().classnames
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    grads = []
    for checkpointing in (False, True):
        expert = CLIPExpert(
            MODEL, str(quick_base), templates="digits", classnames=classnames, gradient_checkpointing=True
        )
        expert.image_encoder.set_grad_checkpointing(checkpointing)
        torch.nn.functional.cross_entropy(expert(images), labels).backward()
        grads.append([p.grad.clone() for p in expert.image_encoder.parameters()])
    assert expert.image_encoder.transformer.grad_checkpointing
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_warmup_longer_than_the_run_warns(quick_base: Path) -> None:
    expert = CLIPExpert(MODEL, str(quick_base), warmup_steps=500)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **QUIET)
    with pytest.warns(UserWarning, match=r"warmup_steps=500 is not below the run's 1 optimiser steps \(max_steps=1\)"):
        trainer.fit(expert, datamodule=_digits(train_domains=["rot0"]))
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(1e-5 * 2 / 500)


def test_a_few_images_for_many_epochs_warn_that_the_schedule_is_longer_than_the_data(quick_base: Path) -> None:
    """A few hundred images at the real-data defaults (500 warm-up steps): ~10 steps that never leave warm-up."""
    expert = CLIPExpert(MODEL, str(quick_base), warmup_steps=500)
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, **QUIET)  # 2 batches an epoch
    wanted = (r"the schedule is longer than the data: warmup_steps=500 is not below the run's 6 optimiser steps "
              r"\(2 batches an epoch × max_epochs=3\), so the learning rate never leaves the warm-up .* Lower "
              r"warmup_steps \(--model.init_args.warmup_steps\), or train for more steps \(--trainer.max_steps, "
              r"--trainer.max_epochs\) or with a smaller batch \(--data.batch_size\)")  # fmt: skip
    with pytest.warns(UserWarning, match=wanted):
        trainer.fit(expert, datamodule=_digits(train_domains=["rot0"]))
    assert trainer.global_step == 6


@pytest.mark.slow
def test_compiled_image_encoder_keeps_its_state_dict_keys(quick_base: Path) -> None:
    expert = CLIPExpert(MODEL, str(quick_base), lr=1e-3, warmup_steps=1, compile_image_encoder=True)
    keys = set(expert.image_encoder.state_dict())
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **QUIET)
    trainer.fit(expert, datamodule=_digits(train_domains=["rot0"]))
    assert set(expert.image_encoder.state_dict()) == keys and trainer.global_step == 2
