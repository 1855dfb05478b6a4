"""callback.merge_with: the earlier experts checked, the new one merged with them, θ₀ + τ* swapped in for the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_score import TaskVector
from lightning_score.callback.merge_with import (
    check_experts,
    check_same_base,
    find_merge,
    merge_expert,
    merged_weights,
    swap_in,
)
from lightning_score.callback.records import Selection
from lightning_score.callback.snapshot import write_snapshot
from lightning_score.merging import merge_task_vectors


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"0.weight": torch.randn(3, 2, generator=g), "0.bias": torch.randn(3, generator=g)}


def _expert(base: dict[str, torch.Tensor], folder: Path, name: str, step: float) -> Path:
    fine = {k: v + step * torch.linspace(-1, 1, v.numel()).reshape(v.shape) for k, v in base.items()}
    return TaskVector.from_state_dicts(base, fine, name=name).save(folder / f"{name}.safetensors")


def test_check_experts_opens_each_file_and_names_the_bad_one(tmp_path: Path) -> None:
    good = _expert(_base(), tmp_path, "a", 0.1)
    check_experts([good])
    check_experts([])
    with pytest.raises(FileNotFoundError, match="task vector '.*missing.safetensors' does not exist"):
        check_experts([good, tmp_path / "missing.safetensors"])
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(ValueError, match="junk.safetensors' is not a safetensors file"):
        check_experts([tmp_path / "junk.safetensors"])


def test_check_same_base_refuses_experts_of_other_weights_and_lets_unrecorded_ones_pass(tmp_path: Path) -> None:
    base = _base()
    own = _expert(base, tmp_path, "a", 0.1)
    fingerprint = TaskVector.load(own).base_fingerprint
    unrecorded = TaskVector({"0.weight": torch.zeros(3, 2)}, {"name": "u"}).save(tmp_path / "u.safetensors")
    check_same_base([own, unrecorded], fingerprint)
    foreign = TaskVector({"0.weight": torch.zeros(3, 2)}, {"base_fingerprint": "blake2b:0000", "base_model": "B/32"})
    path = foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match=r"foreign.safetensors' was made from different pre-trained weights than the "
                                         r"model being fitted: it was fine-tuned from B/32, this fit starts from "
                                         r"tiny/none \(base fingerprints blake2b:0000… vs blake2b:"):  # fmt: skip
        check_same_base([own, path], fingerprint, "tiny/none")
    with pytest.raises(ValueError, match="this fit starts from other weights"):
        check_same_base([path], fingerprint)


def test_merge_expert_puts_the_new_expert_first_and_writes_beside_it(tmp_path: Path) -> None:
    base = _base()
    a, b, c = (_expert(base, tmp_path, name, step) for name, step in (("a", 0.1), ("b", -0.3), ("c", 0.7)))
    path = merge_expert(c, [a, b], "task_arithmetic", 0.5, {}, torch.device("cpu"))
    assert path == tmp_path / "merged-task_arithmetic.safetensors"
    merged = TaskVector.load(path)
    reference = merge_task_vectors([TaskVector.load(p) for p in (c, a, b)], "task_arithmetic", alpha=0.5)
    assert sorted(merged) == sorted(reference)
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    assert merged.metadata["merge"]["method"] == "task_arithmetic"


def test_find_merge_needs_a_fit_that_merged(tmp_path: Path) -> None:
    outputs = {"task_vector": "a.safetensors", "merged": "merged-score.safetensors"}
    assert find_merge(outputs, []) is outputs
    for nothing in (None, {}, {"task_vector": "a.safetensors", "merged": None}):
        with pytest.raises(ValueError, match=r"has no merge to test: no fit with this callback has finished "
                                             r"\(merge_with: \['.*a.safetensors'\]\)\. Fit first"):  # fmt: skip
            find_merge(nothing, [tmp_path / "a.safetensors"])


def _fit_outputs(tmp_path: Path, base: dict[str, torch.Tensor], merged: TaskVector) -> dict[str, str]:
    path, fingerprint = write_snapshot(base, tmp_path)
    return {"pretrained": str(path), "fingerprint": fingerprint, "merged": str(merged.save(tmp_path / "m.safetensors"))}


def test_merged_weights_are_theta0_plus_tau_in_float64_stored_in_theta0s_dtype(tmp_path: Path) -> None:
    base = {**_base(), "half": torch.tensor([2048.0, 2.0, 3.0], dtype=torch.float16), "kept": torch.ones(2)}
    tau = {"0.weight": torch.full((3, 2), 1e-3), "0.bias": torch.randn(3), "half": torch.tensor([1 + 2**-12, 0, 0.5])}
    weights = merged_weights(_fit_outputs(tmp_path, base, TaskVector(tau)))
    assert sorted(weights) == sorted(base)
    for key, value in tau.items():
        reference = (base[key].double() + value.double()).to(base[key].dtype)
        assert weights[key].dtype == base[key].dtype and torch.equal(weights[key], reference), key
    assert torch.equal(weights["kept"], base["kept"])  # no τ* entry: θ₀ itself
    # 2048 + 1.000244 rounds once, up to 2050; in fp16 it rounds twice (τ to 1, then 2049 to even): 2048
    assert weights["half"][0] == 2050 and (base["half"] + tau["half"].half())[0] == 2048
    with pytest.raises(ValueError, match="holds other weights"):
        merged_weights({**_fit_outputs(tmp_path, base, TaskVector(tau)), "fingerprint": "blake2b:0000"})


def test_swap_in_loads_the_merge_into_the_live_weights_and_returns_the_experts_own(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(5.0)  # the expert's own weights
    expert = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)  # as a bf16-true fit leaves it
    tau = TaskVector({"0.weight": torch.full((3, 2), 0.25)})
    weight = model[0].weight
    own = swap_in(Selection.of(model, model), _fit_outputs(tmp_path, base, tau))
    assert model[0].weight is weight and weight.dtype == torch.bfloat16  # in place, dtype kept
    assert torch.equal(weight.detach(), (base["0.weight"].double() + 0.25).float().to(torch.bfloat16))
    assert torch.equal(model[0].bias.detach(), base["0.bias"].to(torch.bfloat16))  # θ₀ where τ* has no entry
    assert sorted(own) == sorted(expert)
    assert all(v.device.type == "cpu" for v in own.values())
    assert torch.equal(own["0.weight"], expert["0.weight"].to(torch.bfloat16))
