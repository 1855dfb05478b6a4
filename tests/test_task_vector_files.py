"""task_vector_files and TaskVector's low-rank entries: factors kept as factors in memory and on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_score.task_vector import LowRankUpdate, TaskVector
from lightning_score.utilities.tensor_files import state_dict_fingerprint


def _lora_tv(seed: int = 0, dtype=torch.float32, scale: float = 2.0) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    low_rank = {
        "fc.weight": LowRankUpdate(torch.randn(32, 4, generator=g), torch.randn(4, 24, generator=g), scale, dtype)
    }
    return TaskVector({"fc.bias": torch.randn(32, generator=g)}, {"name": f"lora{seed}"}, low_rank)


def test_a_low_rank_entry_reads_as_its_dense_update():
    tv = _lora_tv()
    update = tv.low_rank("fc.weight")
    assert sorted(tv) == ["fc.bias", "fc.weight"] and len(tv) == 2 and "fc.weight" in tv
    assert tv.low_rank("fc.bias") is None and tv.low_rank_keys == {"fc.weight"}
    expected = (update.B.double() @ update.A.double() * 2.0).float()
    assert torch.equal(tv["fc.weight"], expected)
    assert tv.tensor_spec("fc.weight") == ((32, 24), torch.float32)


def test_saved_as_factors_and_loaded_without_densifying(tmp_path):
    tv = _lora_tv()
    path = tv.save(tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        header = handle.metadata()
    assert names == {"fc.bias", "fc.weight::B", "fc.weight::A"}  # 32·4 + 4·24 numbers, not 32·24
    assert header["format_version"] == "2"
    assert json.loads(header["low_rank"])["fc.weight"] == {
        "scale": 2.0,
        "dtype": "float32",
        "shape": [32, 24],
        "rank": 4,
    }
    for lazy in (True, False):
        loaded = TaskVector.load(path, lazy=lazy)
        assert loaded.low_rank_keys == {"fc.weight"} and loaded.name == "lora0"
        assert torch.equal(loaded.low_rank("fc.weight").B, tv.low_rank("fc.weight").B)
        assert torch.equal(loaded["fc.weight"], tv["fc.weight"]) and torch.equal(loaded["fc.bias"], tv["fc.bias"])
        assert loaded.tensor_spec("fc.weight") == ((32, 24), torch.float32)
        assert loaded.content_fingerprint() == tv.content_fingerprint()


def test_a_dense_task_vector_file_is_written_as_before(tmp_path):
    tv = TaskVector({"w": torch.ones(3, 3)}, {"name": "d"})
    path = tv.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and "low_rank" not in handle.metadata()
    assert tv.content_fingerprint() == state_dict_fingerprint({"w": torch.ones(3, 3)})


def test_arithmetic_keeps_factors_as_factors():
    a, b = _lora_tv(0), _lora_tv(1, scale=0.5)
    total, difference, scaled = a + b, a - b, 3 * a
    assert total.low_rank("fc.weight").rank == 8 and scaled.low_rank("fc.weight").rank == 4
    for got, expected in (
        (total, a["fc.weight"].double() + b["fc.weight"].double()),
        (difference, a["fc.weight"].double() - b["fc.weight"].double()),
        (scaled, 3 * a["fc.weight"].double()),
    ):
        assert torch.allclose(got["fc.weight"].double(), expected, rtol=1e-5, atol=1e-5)
    dense = TaskVector({k: a[k] for k in a}, a.metadata)
    mixed = a + dense  # a low-rank entry plus a dense one is dense
    assert mixed.low_rank_keys == frozenset() and torch.allclose(mixed["fc.weight"], 2 * a["fc.weight"])
    applied = a.apply_to({"fc.weight": torch.zeros(32, 24), "fc.bias": torch.zeros(32)}, alpha=0.5)
    assert torch.allclose(applied["fc.weight"], 0.5 * a["fc.weight"])


def test_the_fingerprint_follows_the_factors_and_the_scale():
    a = _lora_tv()
    before = a.content_fingerprint()
    assert _lora_tv(scale=2.0).content_fingerprint() == before
    assert _lora_tv(scale=1.0).content_fingerprint() != before
    a.low_rank("fc.weight").B.mul_(2)  # edited in place
    assert a.content_fingerprint() != before


def test_a_key_given_both_ways_and_a_damaged_record_are_refused(tmp_path):
    update = LowRankUpdate(torch.ones(2, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="both as a dense entry and as a low-rank one"):
        TaskVector({"w": torch.ones(2, 2)}, low_rank={"w": update})
    path = _lora_tv().save(tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    del tensors["fc.weight::A"]
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(ValueError, match=r"lora.safetensors.*factors or dtypes are missing.*fc.weight::A"):
        TaskVector.load(path)
