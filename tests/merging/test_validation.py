"""validation: what merge inputs must satisfy, one clear ValueError each, naming the task vector, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.merging.validation import (
    as_task_vectors,
    check_compatible,
    label,
    raise_non_finite,
    shape_and_dtype,
)


def _tv(name: str, base: str | None = None, **tensors: torch.Tensor) -> TaskVector:
    tensors = tensors or {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    return TaskVector(tensors, {"name": name, **({"base_fingerprint": base} if base else {})})


# --- as_task_vectors ----------------------------------------------------------------------------------


def test_mappings_become_named_task_vectors_and_task_vectors_pass_through() -> None:
    own = _tv("photo")
    tvs = as_task_vectors([{"w": torch.ones(2)}, own])
    assert [tv.name for tv in tvs] == ["task 0", "photo"]
    assert tvs[1] is own and isinstance(tvs[0], TaskVector) and torch.equal(tvs[0]["w"], torch.ones(2))


def test_an_empty_list_says_to_pass_at_least_one() -> None:
    with pytest.raises(ValueError, match=r"empty list of task vectors: pass at least one, e\.g\. \[TaskVector\.load"):
        as_task_vectors([])


@pytest.mark.parametrize("bad", [{"w": torch.zeros(2)}, _tv("alone"), (tv for tv in [_tv("gen")]), 3])
def test_a_non_sequence_names_its_type_and_the_fix(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"sequence of task vectors .* got {type(bad).__name__}\. Wrap a single"):
        as_task_vectors(bad)  # type: ignore[arg-type]


def test_an_element_that_is_no_mapping_is_named_by_position() -> None:
    with pytest.raises(ValueError, match="Task vector 1 is a Tensor, not a mapping from keys to tensors"):
        as_task_vectors([{"w": torch.zeros(2)}, torch.zeros(2)])  # type: ignore[list-item]


# --- check_compatible ----------------------------------------------------------------------------------


def test_compatible_task_vectors_pass_and_an_unrecorded_base_is_not_a_mismatch() -> None:
    check_compatible([_tv("a", "blake2b:1"), _tv("b"), _tv("c", "blake2b:1")])


def test_different_base_fingerprints_group_the_tasks_by_base() -> None:
    tvs = [_tv("a", "blake2b:aaaa"), _tv("b", "blake2b:bbbb"), _tv("c", "blake2b:aaaa")]
    with pytest.raises(ValueError) as error:
        check_compatible(tvs)
    message = str(error.value)
    assert "different pre-trained weights (base fingerprints differ)" in message
    assert "blake2b:aaaa…: task 0 (task vector 'a'), task 2 (task vector 'c')" in message
    assert "blake2b:bbbb…: task 1 (task vector 'b')" in message
    assert message.endswith("Merge only experts fine-tuned from the same base model.")


def test_different_keys_name_the_task_and_the_keys() -> None:
    a = _tv("a")
    b = _tv("b", w=torch.zeros(2, 3), extra=torch.zeros(1))
    with pytest.raises(
        ValueError,
        match=r"different keys: task 1 \(task vector 'b'\) lacks 1 key\(s\) of task 0 \(task vector 'a'\) "
        r"\(e\.g\. \['b'\]\) and has 1 it lacks \(e\.g\. \['extra'\]\)\. Make every task vector from the same module",
    ):
        check_compatible([a, b])


def test_a_shape_mismatch_names_the_key_and_both_tasks() -> None:
    a, b = _tv("a"), _tv("b", w=torch.zeros(3, 2), b=torch.zeros(3))
    wanted = (
        r"Key 'w' has shape \(2, 3\) in task 0 \(task vector 'a'\) but \(3, 2\) in task 1 .* share one architecture"
    )
    with pytest.raises(ValueError, match=wanted):
        check_compatible([a, b])


def test_a_dtype_mismatch_names_the_key_and_the_fix() -> None:
    a, b = _tv("a"), _tv("b", w=torch.zeros(2, 3, dtype=torch.float64), b=torch.zeros(3))
    with pytest.raises(
        ValueError, match=r"Key 'w' has dtype torch.float32 in task 0 .* but torch.float64 in task 1 .* convert them"
    ):
        check_compatible([a, b])


def test_a_non_float_key_is_refused_naming_the_key() -> None:
    tv = _tv("a", w=torch.zeros(2, 3), steps=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"Key 'steps' of task 0 \(task vector 'a'\) has dtype torch.int64; .* floating"
    ):
        check_compatible([tv, tv])


# --- the helpers ----------------------------------------------------------------------------------------


def test_label_names_the_file_when_there_is_one(tmp_path: Path) -> None:
    path = _tv("a").save(tmp_path / "photo.safetensors")
    assert label(TaskVector.load(path), 3) == f"task 3 ('{path}')"
    assert label(_tv("a"), 0) == "task 0 (task vector 'a')"


def test_non_finite_values_name_key_task_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Key 'w' of task 1 \(task vector 'b'\) has non-finite .* Re-train it"):
        raise_non_finite([_tv("a"), _tv("b")], "w", 1)


def test_shape_and_dtype_come_from_the_header_of_a_lazy_file(tmp_path: Path) -> None:
    path = TaskVector({"w": torch.zeros(4, 5, dtype=torch.float16)}).save(tmp_path / "e.safetensors")
    assert shape_and_dtype(TaskVector.load(path), "w") == ((4, 5), torch.float16)


def test_an_expert_fitted_with_a_frozen_layer_is_named_by_its_keys_not_as_another_base(tmp_path: Path) -> None:
    from lightning_score import ScoreMergeCallback
    from lightning_score.merging import merge_task_vectors
    from tests.modules import Regressor, data, trainer

    paths = []
    for name, frozen in (("full", False), ("frozen", True)):
        model = Regressor(seed=0)  # the same base weights
        if frozen:
            model.head[0].requires_grad_(False)  # the default selection, trainable parameters, leaves it out
        callback = ScoreMergeCallback(dirpath=tmp_path, filename=f"{name}.safetensors", name=name)
        trainer(tmp_path / name, [callback]).fit(model, data())
        paths.append(tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError) as error:
        merge_task_vectors([TaskVector.load(p) for p in paths], device="cpu")
    message = str(error.value)
    assert "different pre-trained weights" not in message
    assert "frozen.safetensors') lacks 2 key(s)" in message and "['head.0.bias', 'head.0.weight']" in message
    assert "a layer frozen" in message
