"""ScoreMergeCallback's lifecycle: where θ₀ comes from, when it is taken and kept, when τ and the merge are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_score import ScoreMergeCallback, TaskVector
from lightning_score.callback.snapshot import read_snapshot
from lightning_score.task_vector import state_dict_fingerprint
from tests.modules import CompiledRegressor, LazyRegressor, Regressor, data, head_state, trainer
from tests.processes import worker_environment


def _tv(folder: Path, name: str) -> TaskVector:
    return TaskVector.load(folder / f"{name}.safetensors")


# --- item 2: θ₀ of known origin ---------------------------------------------------------------------------


def test_a_reused_callback_measures_each_fit_from_its_own_start(tmp_path: Path) -> None:
    callback = ScoreMergeCallback(dirpath=tmp_path, name="x", overwrite=True)  # the second fit replaces the first
    trainer(tmp_path, [callback]).fit(Regressor(seed=0), data())
    second = Regressor(seed=1)  # other starting weights, same callback
    start = head_state(second)
    trainer(tmp_path, [callback]).fit(second, data())
    tv, end = _tv(tmp_path, "x"), head_state(second)
    for key in tv:
        torch.testing.assert_close(tv[key], end[key] - start[key], rtol=0, atol=0)
    assert tv.base_fingerprint == state_dict_fingerprint(start)


def _checkpointed_fit(tmp_path: Path, callback: ScoreMergeCallback, model: pl.LightningModule) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer(tmp_path, [callback, checkpoint], max_steps=4, enable_checkpointing=True).fit(model, data())
    return tmp_path / "ckpt" / "last.ckpt"


def test_resuming_without_the_callbacks_state_refuses_to_measure_from_the_resume_point(tmp_path: Path) -> None:
    ckpt = _checkpointed_fit(tmp_path, ScoreMergeCallback(dirpath=tmp_path / "a", module="head"), Regressor())
    other_key = ScoreMergeCallback(dirpath=tmp_path / "b")  # module=None: another state key
    with pytest.raises(ValueError, match="has no state under .*measured from the resume point"):
        trainer(tmp_path, [other_key], max_steps=8).fit(Regressor(), data(), ckpt_path=ckpt)
    assert not (tmp_path / "b" / "Regressor.safetensors").exists()


def test_resuming_checks_the_checkpoints_theta0_against_the_modules_base(tmp_path: Path) -> None:
    ckpt = _checkpointed_fit(tmp_path, ScoreMergeCallback(dirpath=tmp_path, name="x"), Regressor(encoder_attr=True))
    with pytest.raises(ValueError, match="comes from a fit of another base model"):
        trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="x")], max_steps=8).fit(
            Regressor(encoder_attr=True, seed=5), data(), ckpt_path=ckpt
        )


def test_resuming_needs_the_snapshot_file(tmp_path: Path) -> None:
    ckpt = _checkpointed_fit(tmp_path, ScoreMergeCallback(dirpath=tmp_path / "a"), Regressor())
    for path in (tmp_path / "a" / "pretrained").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="pre-trained snapshot .* does not exist"):
        trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path / "a")], max_steps=8).fit(
            Regressor(seed=5), data(), ckpt_path=ckpt
        )  # (a module built from the same seed would write the very same snapshot again when fitting starts)


def _start(*args: str | Path, log: Path) -> subprocess.Popen:
    script = Path(__file__).with_name("resume_fit.py")
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=worker_environment(),
                                stdout=output, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]


def test_a_fit_killed_after_its_last_checkpoint_writes_the_task_vector_when_resumed(tmp_path: Path) -> None:
    """SIGKILL after the last checkpoint, before τ: fit(ckpt_path=...) in a new process writes τ as the fit would."""
    limits = ("max_steps", "max_epochs")  # the last step's checkpoint; the last epoch's (written at epoch end)
    killed = {}
    for limit in limits:
        (tmp_path / limit).mkdir()
        killed[limit] = _start("killed", limit, tmp_path / limit, log=tmp_path / f"{limit}-killed.log")
    for limit, process in killed.items():
        out, deadline = tmp_path / limit, time.monotonic() + 300
        while not (out / "at-train-end").exists():
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / f"{limit}-killed.log"
            ).read_text()
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        assert (out / "ckpt" / "last.ckpt").exists() and not (out / "tv" / "x.safetensors").exists()
    resumed = {limit: _start("resumed", limit, tmp_path / limit, log=tmp_path / f"{limit}.log") for limit in limits}
    for limit, process in resumed.items():
        _finish(process, tmp_path / f"{limit}.log")
        out = tmp_path / limit
        tv, reference = (
            TaskVector.load(out / "tv" / "x.safetensors"),
            TaskVector.load(out / "uninterrupted" / "tv" / "x.safetensors"),
        )
        assert tv.metadata == reference.metadata and tv.metadata["global_step"] == 8
        assert sorted(tv) == sorted(reference) and all(torch.equal(tv[k], reference[k]) for k in tv), limit
        assert any(tv[k].abs().sum() > 0 for k in tv)


# --- item 11: θ₀ kept once, on disk ------------------------------------------------------------------------


def test_checkpoints_carry_only_the_path_and_fingerprint_of_theta0(tmp_path: Path) -> None:
    def checkpoint_size(callbacks: list, folder: str) -> int:
        saver = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=2)
        trainer(tmp_path, [*callbacks, saver], max_steps=2, enable_checkpointing=True).fit(
            Regressor(width=512), data()
        )  # the head: ~4,600 weights of θ₀ worth ~18 KB if the checkpoint carried them
        return (tmp_path / folder / "last.ckpt").stat().st_size

    without = checkpoint_size([], "without")
    with_callback = checkpoint_size([ScoreMergeCallback(dirpath=tmp_path / "tvs")], "with")
    assert abs(with_callback - without) < 2_000, (with_callback, without)
    state = torch.load(tmp_path / "with" / "last.ckpt", weights_only=True)["callbacks"]
    record = state["ScoreMergeCallback{'module': None}"]
    assert set(record) == {"module", "pretrained_path", "pretrained_fingerprint"}
    assert Path(record["pretrained_path"]).parent == tmp_path / "tvs" / "pretrained"


def test_experts_of_one_base_share_one_snapshot_written_once(tmp_path: Path) -> None:
    for name in ("a", "b"):
        trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name=name)]).fit(Regressor(), data())
        (snapshot,) = (tmp_path / "pretrained").iterdir()
        if name == "a":
            first_written = snapshot.stat().st_mtime_ns
    assert snapshot.stat().st_mtime_ns == first_written  # the second fit found it and did not rewrite it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "pretrained"]
    assert snapshot.name == _tv(tmp_path, "a").base_fingerprint.replace(":", "-") + ".safetensors"


def _flip_a_bit_of_the_tensors(path: Path) -> None:
    """Flip one bit in the tensor bytes of a safetensors file (after its 8-byte length and JSON header)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_damaged_snapshot_is_written_again_never_reused(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="a")]).fit(Regressor(), data())
    (snapshot,) = (tmp_path / "pretrained").iterdir()
    _flip_a_bit_of_the_tensors(snapshot)  # bit rot on disk: the header (and the file name) still look right
    model = Regressor()
    start = head_state(model)
    with pytest.warns(UserWarning, match=f"snapshot '{snapshot}' cannot be reused .*damaged.*written again"):
        trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="b")]).fit(model, data())
    tv, end = _tv(tmp_path, "b"), head_state(model)
    for key in tv:  # measured from the weights the fit started from, not from the damaged file
        torch.testing.assert_close(tv[key], end[key] - start[key], rtol=0, atol=0)
    assert tv.base_fingerprint == state_dict_fingerprint(start)
    assert read_snapshot(snapshot, tv.base_fingerprint, verify=True)  # the file was repaired


# --- item 4: precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "bf16-mixed", "64-true"])
def test_theta0_in_the_weights_own_precision_whatever_the_training_precision(precision: str, tmp_path: Path) -> None:
    first = Regressor()
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="fp32")]).fit(first, data())
    model = Regressor(lr=0.5)
    start = head_state(model)  # float32, as built
    callback = ScoreMergeCallback(dirpath=tmp_path, name="half", merge_with=[tmp_path / "fp32.safetensors"],
                                  method="average")  # fmt: skip
    trainer(tmp_path, [callback], precision=precision).fit(model, data())
    tv, end = _tv(tmp_path, "half"), head_state(model)
    assert tv.base_fingerprint == state_dict_fingerprint(start)  # the float32 base's: merges with fp32 experts
    assert tv.metadata["precision"] == precision
    for key in tv:
        assert tv[key].dtype == torch.float32
        # τ = θ_T − θ₀ with θ₀ in float32 (as built), θ_T in whatever precision it trained in (float64 reference)
        torch.testing.assert_close(tv[key], (end[key].double() - start[key].double()).float(), rtol=0, atol=0)
        trained_in = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "bf16-mixed": torch.float32,
                      "64-true": torch.float64}[precision]  # fmt: skip
        assert end[key].dtype == trained_in
    assert callback.merged_path is not None and callback.merged_path.exists()


def test_16_mixed_on_cpu_is_what_lightning_makes_it(tmp_path: Path) -> None:
    """Lightning runs `16-mixed` on a CPU as `bf16-mixed` (with a warning): the task vector records that."""
    model = Regressor()
    start = head_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="amp")], precision="16-mixed")
    assert any("Using `precision='bf16-mixed'` instead" in str(w.message) for w in caught)
    fit.fit(model, data())
    tv, end = _tv(tmp_path, "amp"), head_state(model)
    assert tv.metadata["precision"] == "bf16-mixed" and tv.base_fingerprint == state_dict_fingerprint(start)
    for key in tv:
        torch.testing.assert_close(tv[key], end[key] - start[key], rtol=0, atol=0)


# --- item 5: the merge runs before the strategy tears down -------------------------------------------------


class RecordingStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy, noting what exists when it tears down (moves the module to CPU)."""

    def __init__(self, watch: Path) -> None:
        super().__init__(device=torch.device("cpu"))
        self.watch = watch
        self.seen_at_teardown: list[bool] = []

    def teardown(self) -> None:
        self.seen_at_teardown.append(self.watch.exists())
        super().teardown()


def test_task_vector_and_merge_are_written_while_the_module_is_on_its_device(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="a")]).fit(Regressor(), data())
    strategy = RecordingStrategy(tmp_path / "merged-average.safetensors")
    callback = ScoreMergeCallback(dirpath=tmp_path, name="b", merge_with=[tmp_path / "a.safetensors"], method="average")
    options = dict(default_root_dir=tmp_path, max_steps=6, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    pl.Trainer(strategy=strategy, callbacks=[callback], **options).fit(Regressor(), data())
    assert strategy.seen_at_teardown == [True]
    assert TaskVector.load(callback.merged_path).metadata["merge"]["device"] == "cpu"


# --- items 9 and 10: compiled and lazy modules -------------------------------------------------------------


def test_compiled_submodules_give_plain_keys_that_merge(tmp_path: Path) -> None:
    plain = Regressor()
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="plain")]).fit(plain, data())
    compiled = CompiledRegressor()
    start = head_state(compiled)
    callback = ScoreMergeCallback(dirpath=tmp_path, name="compiled", merge_with=[tmp_path / "plain.safetensors"],
                                  method="average")  # fmt: skip
    fit = trainer(tmp_path, [callback])
    fit.fit(compiled, data())
    tv = _tv(tmp_path, "compiled")
    assert sorted(tv) == sorted(_tv(tmp_path, "plain")) == ["head.0.bias", "head.0.weight", "head.2.bias",
                                                            "head.2.weight"]  # fmt: skip
    end = head_state(compiled)
    for key in tv:
        torch.testing.assert_close(tv[key], end[key] - start[key], rtol=0, atol=0)
    fit.test(compiled, data(), verbose=False)  # the merged weights load into the compiled module and back
    assert all(torch.equal(v, end[k]) for k, v in head_state(compiled).items())


def test_lazy_modules_are_snapshotted_once_materialised(tmp_path: Path) -> None:
    model = LazyRegressor()
    materialised: dict[str, torch.Tensor] = {}

    def keep_first(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not materialised:
            materialised.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    model.head[0].register_forward_hook(keep_first)
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="lazy")]).fit(model, data())
    tv = _tv(tmp_path, "lazy")
    assert {"head.0.weight", "head.0.bias"} <= set(tv) and tv["head.0.weight"].shape == (6, 8)
    for name in ("weight", "bias"):
        after = getattr(model.head[0], name).detach()
        torch.testing.assert_close(tv[f"head.0.{name}"], after - materialised[name], rtol=0, atol=0)
        assert tv[f"head.0.{name}"].abs().sum() > 0


def test_a_resumed_lazy_module_keeps_the_checkpoints_theta0(tmp_path: Path) -> None:
    """The resume point's weights are not θ₀: a resumed lazy fit measures from the first fit's start, as uninterrupted."""
    torch.manual_seed(0)  # a lazy layer draws its initial weights at the first forward: seed right before each fit
    trainer(tmp_path / "whole", [ScoreMergeCallback(dirpath=tmp_path / "whole", name="lazy")]).fit(
        LazyRegressor(), data()
    )
    torch.manual_seed(0)
    first = LazyRegressor()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)  # an epoch's end
    callback = ScoreMergeCallback(dirpath=tmp_path / "resumed", name="lazy")
    trainer(tmp_path / "a", [callback, checkpoints], max_steps=4, enable_checkpointing=True).fit(first, data())
    torch.manual_seed(0)
    again = LazyRegressor()
    resumed = ScoreMergeCallback(dirpath=tmp_path / "resumed", name="lazy")
    fit = trainer(tmp_path / "b", [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], enable_checkpointing=True)
    fit.fit(again, data(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    expected, tv = _tv(tmp_path / "whole", "lazy"), _tv(tmp_path / "resumed", "lazy")
    assert sorted(tv) == sorted(expected) and tv.metadata["global_step"] == 6
    assert tv.base_fingerprint == expected.base_fingerprint
    for key in tv:
        torch.testing.assert_close(tv[key], expected[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


# --- item 1 (one process): testing with merge_with needs a merge --------------------------------------------


def test_testing_with_merge_with_before_any_fit_raises(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="a")]).fit(Regressor(), data())
    callback = ScoreMergeCallback(dirpath=tmp_path, name="b", merge_with=[tmp_path / "a.safetensors"])
    with pytest.raises(ValueError, match="has no merge to test"):
        trainer(tmp_path, [callback]).test(Regressor(), data(), verbose=False)


# --- the selection: made once, in setup ----------------------------------------------------------------------------


class CountingCallback(ScoreMergeCallback):
    """Counts how often the override point is asked."""

    calls = 0

    def select_module(self, pl_module: pl.LightningModule) -> tuple[torch.nn.Module, list[str] | None]:
        self.calls += 1
        return super().select_module(pl_module)


def test_what_to_snapshot_is_selected_once_per_fit_and_once_per_test(tmp_path: Path) -> None:
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path, name="a")]).fit(Regressor(), data())
    callback = CountingCallback(dirpath=tmp_path, name="b", merge_with=[tmp_path / "a.safetensors"], method="average")
    fit = trainer(tmp_path, [callback])
    fit.fit(Regressor(), data())
    assert callback.calls == 1  # setup; on_fit_start, on_train_end and the snapshot reuse it
    fit.test(Regressor(), data(), verbose=False)
    assert callback.calls == 2  # the test's setup selects in the module it tests


class ReplacingRegressor(Regressor):
    """``configure_model`` replaces the head by one of other weights, after the callback's ``setup``."""

    def configure_model(self) -> None:
        if not getattr(self, "replaced", False):
            torch.manual_seed(7)
            self.head = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
            self.replaced = True
            self.start = head_state(self)


def test_a_submodule_replaced_in_configure_model_is_followed(tmp_path: Path) -> None:
    model = ReplacingRegressor()
    callback = CountingCallback(dirpath=tmp_path, name="r", module="head")
    trainer(tmp_path, [callback]).fit(model, data())
    assert callback.calls == 2  # setup, then once more at the start of fitting: the head kept is gone
    tv, end = _tv(tmp_path, "r"), head_state(model)
    for key in tv:
        torch.testing.assert_close(tv[key], end[f"head.{key}"] - model.start[f"head.{key}"], rtol=0, atol=0)
        assert tv[key].abs().sum() > 0
    assert tv.base_fingerprint == state_dict_fingerprint({k[5:]: v for k, v in model.start.items()})
