"""ScoreMergeCallback on a Trainer fine-tuning a PEFT-LoRA model: the task vector of the weight updates, base keys."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_score import ScoreMergeCallback, TaskVector
from lightning_score.merging import merge_task_vectors
from tests.modules import data, trainer
from tests.processes import run_script

peft = pytest.importorskip("peft")

from tests.lora_modules import LORA_KEYS, LoraRegressor, Net, lora_update  # noqa: E402


@pytest.mark.parametrize(
    ("precision", "adapters"), [("32-true", "factors"), ("32-true", "merged"), ("bf16-true", "merged")]
)
def test_the_task_vector_of_a_lora_fit_is_merge_and_unloads_update_under_the_base_keys(
    tmp_path: Path, precision: str, adapters: str
) -> None:
    torch.manual_seed(0)
    base = Net()
    module = LoraRegressor(copy.deepcopy(base))
    callback = ScoreMergeCallback(dirpath=tmp_path / "tvs", name="lora", adapters=adapters)
    trainer(tmp_path, [callback], precision=precision).fit(module, data())
    tv = TaskVector.load(tmp_path / "tvs" / "lora.safetensors")
    factors = {"net.attn.in_proj_weight", "net.attn.out_proj.weight", "net.fc1.weight"}
    assert tv.low_rank_keys == (factors if adapters == "factors" else frozenset())  # fc2 (saved module): dense
    # the trainable parameters were the adapters and the saved fc2: the task vector holds the weights they change
    assert sorted(tv) == LORA_KEYS
    # θ₀ is the base as given (float32, before the precision plugin converts the module), as for any expert
    expected = lora_update(module, base)
    assert tv.metadata["adapters"] == {
        "peft_version": peft.__version__,
        "type": "LORA",
        "adapters": {
            "default": {
                "r": [2],
                "lora_alpha": [4.0],
                "scaling": [2.0],
                "targets": ["net.attn", "net.attn.out_proj", "net.fc1"],
            }
        },
    }
    for key in tv:
        torch.testing.assert_close(tv[key].double(), expected[key], rtol=0, atol=1e-6, msg=key)
        assert tv[key].abs().sum() > 0, key


def test_in_bf16_true_the_factors_are_the_exact_update_merge_and_unload_rounds(tmp_path: Path) -> None:
    """bf16-true: the factors' product is s·B·A exactly; merge_and_unload() rounds θ₀ + s·B·A to bfloat16."""
    torch.manual_seed(0)
    base = Net()
    module = LoraRegressor(copy.deepcopy(base))
    trainer(tmp_path, [ScoreMergeCallback(dirpath=tmp_path / "tvs", name="lora")], precision="bf16-true").fit(
        module, data()
    )
    tv = TaskVector.load(tmp_path / "tvs" / "lora.safetensors")
    layer = module.net.base_model.model.fc1
    B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
    update = tv.low_rank("net.fc1.weight")
    assert update is not None and update.B.dtype == torch.bfloat16  # the trained factors, as they are
    assert update.dtype == tv["net.fc2.weight"].dtype == torch.float32  # the update in θ₀'s dtype, as every entry
    torch.testing.assert_close(update.dense(torch.float64), B @ A * layer.scaling["default"], rtol=0, atol=1e-12)
    rounded = lora_update(module, base)  # bfloat16 weights minus θ₀: within a bfloat16 step of the weights
    for key in ("net.fc1.weight", "net.attn.in_proj_weight", "net.attn.out_proj.weight"):
        step = (base.state_dict()[key.removeprefix("net.")].abs().max().item() + tv[key].abs().max().item()) * 2**-7
        torch.testing.assert_close(tv[key].double(), rounded[key], rtol=0, atol=step, msg=key)


def test_lora_and_full_fine_tune_experts_of_one_base_merge_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Net()
    lora = LoraRegressor(copy.deepcopy(base), encoder_attr=True)
    full = LoraRegressor(copy.deepcopy(base), lora=False, encoder_attr=True)
    for name, module in (("lora", lora), ("full", full)):
        trainer(tmp_path / name, [ScoreMergeCallback(dirpath=tmp_path / "tvs", name=name)]).fit(module, data())
    tvs = [TaskVector.load(tmp_path / "tvs" / f"{name}.safetensors") for name in ("lora", "full")]
    assert sorted(tvs[0]) == sorted(tvs[1]) == sorted(base.state_dict())  # the whole encoder, by the base's keys
    assert tvs[0].base_fingerprint == tvs[1].base_fingerprint
    expected = {key.removeprefix("net."): value for key, value in lora_update(lora, base).items()}
    for key in tvs[0]:
        torch.testing.assert_close(tvs[0][key].double(), expected[key], rtol=0, atol=1e-6, msg=key)
    assert torch.count_nonzero(tvs[0]["fc1.bias"]) == 0  # frozen under LoRA: a zero update
    merged = merge_task_vectors(tvs, "score")
    assert sorted(merged) == sorted(base.state_dict())
    assert all(torch.isfinite(value).all() for value in merged.values())
    # an element-wise method on these experts is their average, key by key
    average = merge_task_vectors(tvs, "average")
    torch.testing.assert_close(average["fc1.weight"], (tvs[0]["fc1.weight"] + tvs[1]["fc1.weight"]) / 2)


def test_merge_with_inside_an_adapted_module_is_refused_not_tested_silently(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = Net()
    first = LoraRegressor(copy.deepcopy(base), encoder_attr=True)
    trainer(tmp_path / "a", [ScoreMergeCallback(dirpath=tmp_path / "tvs", name="a")]).fit(first, data())
    second = LoraRegressor(copy.deepcopy(base), encoder_attr=True)
    callback = ScoreMergeCallback(dirpath=tmp_path / "tvs", name="b", merge_with=[tmp_path / "tvs" / "a.safetensors"])
    fitter = trainer(tmp_path / "b", [callback], limit_test_batches=1)
    fitter.fit(second, data())

    with pytest.raises(ValueError, match=r"PEFT-adapted module.*merged_path"):
        fitter.test(second, data())


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_a_two_process_lora_fit_writes_merge_and_unloads_update(tmp_path: Path, strategy: str) -> None:
    run_script(Path(__file__).resolve().parent / "ddp_lora_fit.py", str(tmp_path), strategy)
    assert sorted(p.name for p in (tmp_path / "task_vectors").iterdir()) == ["lora.safetensors", "pretrained"]
    tv, expected = TaskVector.load(tmp_path / "task_vectors" / "lora.safetensors"), torch.load(tmp_path / "expected.pt")
    assert sorted(tv) == LORA_KEYS
    assert tv.metadata["global_step"] == 4
    for key in tv:
        torch.testing.assert_close(tv[key].double(), expected[key], rtol=0, atol=1e-6, msg=key)
        assert tv[key].abs().sum() > 0, key
