"""MergeModule's lifecycle: one merge reused at any α, golden α search, source data only, passes run as
Lightning's evaluation does, nothing saved before a merge, checkpoints restored without re-merging."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_score import DomainDataModule, MergeModule, TaskVector
from lightning_score.merging import merge_task_vectors
from lightning_score.models import build_clip
from tests.experts import MODEL, QUIET, digits

SOURCES = {"train_domains": ["rot0", "rot60"], "test_domains": ["rot30"]}


def _tvs(paths: dict[str, Path], *domains: str) -> list[str]:
    return [str(paths[d]) for d in domains or ("rot0", "rot60")]


def _base(quick_base: Path) -> dict[str, torch.Tensor]:
    return build_clip(MODEL, str(quick_base)).model.visual.state_dict()


def test_use_alpha_reloads_theta0_plus_alpha_tau_from_the_one_merge(
    quick_base: Path, expert_task_vectors: dict
) -> None:
    tvs = _tvs(expert_task_vectors)
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="ties", templates="digits")
    with pytest.raises(RuntimeError, match="has no merge yet"):
        module.use_alpha(0.5)
    L.Trainer(**QUIET).test(module, datamodule=digits(**SOURCES), verbose=False)
    merged, seconds = module.merged, module.merge_seconds
    expected = merge_task_vectors([TaskVector.load(p) for p in tvs], "ties", device="cpu")
    base = _base(quick_base)
    for alpha in (0.5, 1.7, 0.0):
        module.use_alpha(alpha)
        assert module.merged is merged and module.merge_seconds == seconds and module.current_alpha == alpha
        for key, value in module.image_encoder.state_dict().items():
            want = (base[key].double() + alpha * expected[key].double()).float() if key in expected else base[key]
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6)
    at_half = L.Trainer(**QUIET).test(module, datamodule=digits(**SOURCES), verbose=False)[0]  # no re-merge in setup
    assert module.merged is merged and module.current_alpha == 0.0 and "test/rot30/acc" in at_half
    expert = MergeModule(MODEL, str(quick_base), task_vectors=tvs[:1], mode="expert", templates="digits")
    with pytest.raises(ValueError, match="use_alpha applies to mode='merge'"):
        expert.use_alpha(0.5)


def test_golden_alpha_search_end_to_end(quick_base: Path, expert_task_vectors: dict) -> None:
    module = MergeModule(MODEL, str(quick_base), task_vectors=_tvs(expert_task_vectors), method="tsv", alpha="auto",
                         alpha_search="golden", templates="digits")  # fmt: skip
    results = L.Trainer(**QUIET).test(module, datamodule=digits(**SOURCES), verbose=False)[0]
    search = module.alpha_search_result.to_dict()
    assert search["method"] == "golden" and 5 <= len(search["alphas"]) <= 17
    assert all(0.0 <= a <= 2.0 for a in search["alphas"])
    best = max(search["val_acc"])
    assert search["val_acc"][search["alphas"].index(search["selected"])] == best
    assert results["alpha"] == pytest.approx(search["selected"]) and module.current_alpha == search["selected"]
    with pytest.raises(ValueError, match="alpha_search='random' is not one of"):
        MergeModule(MODEL, str(quick_base), task_vectors=_tvs(expert_task_vectors), alpha_search="random")


class RecordingData(DomainDataModule):
    """The real datamodule, recording which loaders are asked for, in order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("builtin:digits", num_workers=0, batch_size=64, **kwargs)
        self.calls: list[tuple[str, ...]] = []

    def val_dataloader(self) -> Any:
        self.calls.append(("val",))
        return super().val_dataloader()

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> Any:
        self.calls.append(("proxy", domain))
        return super().proxy_dataloader(domain, num_images, batch_size)

    def test_dataloader(self) -> Any:
        self.calls.append(("test", "after the merge" if self.trainer.lightning_module.merged else "before the merge"))
        return super().test_dataloader()

    def predict_dataloader(self) -> Any:
        self.calls.append(("predict",))
        return super().predict_dataloader()

    def train_dataloader(self) -> Any:
        self.calls.append(("train",))
        return super().train_dataloader()


@pytest.mark.parametrize("method", ["esm", "score"])
def test_alpha_search_and_esm_read_only_the_sources_validation_data(
    method: str, quick_base: Path, expert_task_vectors: dict
) -> None:
    data = RecordingData(**SOURCES)
    module = MergeModule(MODEL, str(quick_base), task_vectors=_tvs(expert_task_vectors), method=method, alpha="auto",
                         alpha_grid=[0.5, 1.0], proxy_images=8, templates="digits")  # fmt: skip
    L.Trainer(**QUIET).test(module, datamodule=data, verbose=False)
    first_test = data.calls.index(("test", "after the merge"))  # the test loader is asked for after the merge ...
    before = data.calls[:first_test]
    assert ("val",) in before  # ... the α search read the validation data ...
    assert all(call[0] in ("val", "proxy") for call in before), before  # ... and nothing else before the test
    assert all(call[0] == "test" for call in data.calls[first_test:]), data.calls
    proxies = [call[1] for call in before if call[0] == "proxy"]
    assert sorted(proxies) == (["rot0", "rot60"] if method == "esm" else [])


class PassSpy(L.Callback):
    """Records how the image encoder runs before the test loop starts (the α search and ESM's passes)."""

    def __init__(self) -> None:
        self.testing = False
        self.records: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if not self.testing:
                self.records.append({
                    "training": module.training,
                    "inference": torch.is_inference_mode_enabled(),
                    "autocast": torch.is_autocast_enabled("cpu"),
                    "autocast_dtype": torch.get_autocast_dtype("cpu"),
                    "weights": next(module.parameters()).dtype,
                    "inputs": args[0].dtype,
                })  # fmt: skip

        pl_module.image_encoder.register_forward_pre_hook(hook)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.testing = True


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_merge_passes_run_in_eval_and_inference_mode_under_the_trainers_precision(
    precision: str, quick_base: Path, expert_task_vectors: dict
) -> None:
    spy = PassSpy()
    module = MergeModule(MODEL, str(quick_base), task_vectors=_tvs(expert_task_vectors), method="esm", alpha="auto",
                         alpha_grid=[0.5, 1.0], proxy_images=8, templates="digits")  # fmt: skip
    L.Trainer(precision=precision, callbacks=[spy], **QUIET).test(module, datamodule=digits(**SOURCES), verbose=False)
    assert len(spy.records) >= 2 + 2  # one proxy pass per expert (ESM) and the α grid's validation batches
    for record in spy.records:
        assert not record["training"] and record["inference"], record
        if precision == "bf16-mixed":
            assert record["autocast"] and record["autocast_dtype"] == torch.bfloat16, record
        else:
            assert record["weights"] == torch.bfloat16 and record["inputs"] == torch.bfloat16, record
    assert module.image_encoder.training is False or module.training == module.image_encoder.training


def test_save_merged_before_setup_refuses_to_write_the_base(quick_base: Path, expert_task_vectors: dict,
                                                             tmp_path: Path) -> None:  # fmt: skip
    module = MergeModule(MODEL, str(quick_base), task_vectors=_tvs(expert_task_vectors), templates="digits")
    with pytest.raises(RuntimeError, match="still holds the pre-trained weights"):
        module.save_merged(tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_load_from_checkpoint_restores_the_merge_without_merging_again(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path
) -> None:
    copies = []
    for domain in ("rot0", "rot60"):  # the merge reads copies, which are replaced afterwards
        copies.append(tmp_path / f"{domain}.safetensors")
        shutil.copy(expert_task_vectors[domain], copies[-1])
    module = MergeModule(MODEL, str(quick_base), task_vectors=[str(p) for p in copies], method="ties", alpha="auto",
                         alpha_grid=[0.6, 1.0], templates="digits")  # fmt: skip
    trainer = L.Trainer(default_root_dir=tmp_path, **QUIET)
    first = trainer.test(module, datamodule=digits(**SOURCES), verbose=False)[0]
    trainer.save_checkpoint(tmp_path / "merge.ckpt")
    merged_weights = {k: v.clone() for k, v in module.image_encoder.state_dict().items()}
    shutil.copy(expert_task_vectors["rot30"], copies[0])  # other files now sit at the saved paths
    restored = MergeModule.load_from_checkpoint(tmp_path / "merge.ckpt")
    second = L.Trainer(**QUIET).test(restored, datamodule=digits(**SOURCES), verbose=False)[0]
    for key, value in restored.image_encoder.state_dict().items():
        assert torch.equal(value, merged_weights[key]), key
    assert second == pytest.approx(first)
    assert restored.alpha_search_result == module.alpha_search_result and restored.current_alpha == module.current_alpha
    for path in copies:
        path.unlink()  # the task-vector files are not needed to restore the merged weights
    again = MergeModule.load_from_checkpoint(tmp_path / "merge.ckpt")
    assert all(torch.equal(v, merged_weights[k]) for k, v in again.image_encoder.state_dict().items())
    third = L.Trainer(**QUIET).test(again, datamodule=digits(**SOURCES), verbose=False)[0]  # setup reads no file
    assert third == pytest.approx(first)
    assert all(torch.equal(v, merged_weights[k]) for k, v in again.image_encoder.state_dict().items())
    with pytest.raises(RuntimeError, match="keeps its merged weights but not τ"):
        again.use_alpha(0.6)  # τ* is not in the checkpoint
    path = again.save_merged(tmp_path / "restored.safetensors")
    assert path.exists()
