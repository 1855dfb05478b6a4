"""TaskVector: construction, arithmetic, application, safetensors storage and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_score import TaskVector
from lightning_score.task_vector import state_dict_fingerprint


def _pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pre = {"w": torch.randn(4, 3), "b": torch.randn(3), "steps": torch.tensor(5), "h": torch.randn(2).half()}
    fine = {k: (v + 1 if v.is_floating_point() else v + 7) for k, v in pre.items()}
    return pre, fine


def test_from_state_dicts_skips_integer_buffers_and_records_the_base() -> None:
    pre, fine = _pair()
    tv = TaskVector.from_state_dicts(pre, fine, name="art", domain="art_painting", base_model="tiny/none")
    assert sorted(tv) == ["b", "h", "w"]
    torch.testing.assert_close(tv["w"], fine["w"] - pre["w"])
    assert tv["h"].dtype == torch.float16
    assert tv.base_fingerprint == state_dict_fingerprint(pre)
    assert (tv.name, tv.domain, tv.base_model) == ("art", "art_painting", "tiny/none")


def test_from_state_dicts_rejects_mismatches() -> None:
    pre, fine = _pair()
    with pytest.raises(ValueError, match="'w' has shape"):
        TaskVector.from_state_dicts(pre, {**fine, "w": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="lacks 1 key"):
        TaskVector.from_state_dicts(pre, {k: v for k, v in fine.items() if k != "b"})
    with pytest.raises(ValueError, match="'steps' is not floating point"):
        TaskVector.from_state_dicts(pre, fine, keys=["steps"])


def test_fingerprint_sees_every_byte_and_key() -> None:
    pre, _ = _pair()
    changed = dict(pre)
    changed["w"] = pre["w"].clone()
    changed["w"][3, 2] += 1e-6
    assert state_dict_fingerprint(pre) != state_dict_fingerprint(changed)
    assert state_dict_fingerprint(pre) != state_dict_fingerprint({"v": pre["w"], "b": pre["b"], "h": pre["h"]})
    assert state_dict_fingerprint(pre) == state_dict_fingerprint({k: v.clone() for k, v in pre.items()})


def test_arithmetic() -> None:
    pre, fine = _pair()
    a = TaskVector.from_state_dicts(pre, fine)
    b = 3 * a
    torch.testing.assert_close((b - a)["w"], 2 * a["w"])
    torch.testing.assert_close((a + b)["b"], 4 * a["b"])
    torch.testing.assert_close((-a)["w"], -a["w"])
    assert (a * 0.5).base_fingerprint == a.base_fingerprint
    other = TaskVector({"w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="different keys"):
        a + other
    foreign = TaskVector(dict(a), {"base_fingerprint": "blake2b:00"})
    with pytest.raises(ValueError, match="different pre-trained weights"):
        a + foreign


def test_apply_to_state_dict_and_module() -> None:
    module = nn.Linear(3, 2)
    pre = {k: v.clone() for k, v in module.state_dict().items()}
    fine = {k: v + 0.25 for k, v in pre.items()}
    tv = TaskVector.from_state_dicts(pre, fine)
    out = tv.apply_to(pre, alpha=2.0)
    torch.testing.assert_close(out["weight"], pre["weight"] + 0.5)
    torch.testing.assert_close(pre["weight"], module.weight.detach())  # the input dict is untouched
    assert tv.apply_to(module, alpha=1.0) is module
    torch.testing.assert_close(module.weight.detach(), fine["weight"])
    with pytest.raises(ValueError, match="has key 'weight' that the target lacks"):
        tv.apply_to({"bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        tv.apply_to({"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


def test_apply_to_exempt_keys_get_the_update_unscaled_and_every_key_is_computed_in_float64() -> None:
    pre = {"w": torch.full((2, 2), 1.0), "b": torch.zeros(2), "h": torch.full((3,), 1.0, dtype=torch.bfloat16)}
    tv = TaskVector({"w": torch.full((2, 2), 0.5), "b": torch.ones(2), "h": torch.full((3,), 2.0**-9)})
    out = tv.apply_to(pre, alpha=0.5, exempt=["b"])
    assert torch.equal(out["w"], torch.full((2, 2), 1.25)) and torch.equal(out["b"], torch.ones(2))
    # 1 + 0.5·2⁻⁹ is between two bfloat16 values: computed in float64 and rounded once, as θ₀'s dtype says
    expected = (torch.ones(3, dtype=torch.float64) + 0.5 * 2.0**-9).to(torch.bfloat16)
    assert out["h"].dtype == torch.bfloat16 and torch.equal(out["h"], expected)
    module = nn.Linear(2, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    TaskVector({"weight": torch.ones(2, 2), "bias": torch.ones(2)}).apply_to(module, alpha=3.0, exempt=["bias"])
    torch.testing.assert_close(module.weight.detach(), state["weight"] + 3.0, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.bias.detach(), state["bias"] + 1.0, rtol=0, atol=1e-6)


def test_from_state_dicts_keeps_the_pre_trained_dtype_when_training_changed_it() -> None:
    """A bf16-true fit: the weights end in bfloat16, θ₀ was float32; τ keeps θ₀'s precision (float64 difference)."""
    pre = {"w": torch.tensor([1.0, 2.0, 3.0]) / 3}
    fine = {"w": (pre["w"] + 0.125).to(torch.bfloat16)}
    tv = TaskVector.from_state_dicts(pre, fine)
    assert tv["w"].dtype == torch.float32
    assert torch.equal(tv["w"], (fine["w"].double() - pre["w"].double()).float())


@pytest.mark.parametrize("lazy", [True, False])
def test_save_load_round_trip(tmp_path: Path, lazy: bool) -> None:
    pre, fine = _pair()
    tv = TaskVector.from_state_dicts(pre, fine, name="photo", extra={"steps": 3})
    path = tv.save(tmp_path / "sub" / "photo.safetensors")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    loaded = TaskVector.load(path, lazy=lazy)
    assert loaded.path == path and loaded.metadata == tv.metadata
    assert sorted(loaded) == sorted(tv)
    for key in tv:
        assert torch.equal(loaded[key], tv[key]) and loaded.tensor_spec(key) == (tuple(tv[key].shape), tv[key].dtype)
    assert pickle.loads(pickle.dumps(loaded))["w"].shape == (4, 3)  # lazy handles survive pickling (workers)


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pre, fine = _pair()
    tv = TaskVector.from_state_dicts(pre, fine)
    target = tmp_path / "tv.safetensors"
    tv.save(target)
    before = target.read_bytes()

    def broken_save(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_score.task_vector.save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        (2 * tv).save(target)
    assert target.read_bytes() == before  # the old file is intact, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["tv.safetensors"]


def test_load_rejects_what_is_not_a_task_vector(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*ScoreMergeCallback"):
        TaskVector.load(tmp_path / "missing.safetensors")
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(ValueError, match="not a safetensors file.*never pickles"):
        TaskVector.load(pickled)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a lightning-score task vector"):
        TaskVector.load(plain)
    with pytest.raises(ValueError, match="is a folder"):
        TaskVector.load(tmp_path)


def test_metadata_must_be_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        TaskVector({"w": torch.zeros(1)}, {"when": object()})


def test_saved_files_have_ordinary_permissions(tmp_path: Path) -> None:
    """Atomic writes go through a temporary file, which is owner-only; the result must not be."""
    import os

    from lightning_score.utilities.files import ordinary_mode

    old = os.umask(0o022)
    try:
        path = TaskVector({"w": torch.zeros(2)}).save(tmp_path / "tv.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and ordinary_mode() == 0o666 & ~old


def test_content_fingerprint_names_the_content_not_the_metadata(tmp_path) -> None:
    a = TaskVector({"w": torch.ones(3, 2), "b": torch.zeros(2)}, {"name": "a"})
    same = TaskVector({"b": torch.zeros(2), "w": torch.ones(3, 2)}, {"name": "other name"})
    changed = TaskVector({"w": torch.ones(3, 2), "b": torch.tensor([0.0, 1e-30])}, {"name": "a"})
    half = TaskVector({"w": torch.ones(3, 2, dtype=torch.float16), "b": torch.zeros(2)}, {"name": "a"})
    assert a.content_fingerprint() == same.content_fingerprint()
    assert len({a.content_fingerprint(), changed.content_fingerprint(), half.content_fingerprint()}) == 3
    path = a.save(tmp_path / "a.safetensors")
    assert TaskVector.load(path).content_fingerprint() == a.content_fingerprint()
    changed.save(path)  # the same file name, new content: a new fingerprint
    assert TaskVector.load(path).content_fingerprint() == changed.content_fingerprint()
