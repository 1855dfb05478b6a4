"""merge_module.inputs: MergeModule's arguments, the task-vector count of each mode, and the base check."""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_score.merge_module.inputs import (
    MODES,
    ResolvedMethod,
    check_arguments,
    check_base,
    check_count,
    check_held_out,
    expert_domains,
    held_out,
    load_task_vectors,
    read_inputs,
)
from lightning_score.merging import get_method
from lightning_score.task_vector import TaskVector, state_dict_fingerprint

ENCODER = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
BASE = "toy/base"
FINGERPRINT = state_dict_fingerprint(ENCODER)


def _task_vector(fingerprint: str | None = FINGERPRINT, **tensors: torch.Tensor) -> TaskVector:
    tensors = tensors or {"w": torch.ones(2, 3), "b": torch.ones(3)}
    meta = {"name": "rot0", "domain": "rot0", "base_model": "toy/theirs"}
    if fingerprint is not None:
        meta["base_fingerprint"] = fingerprint
    return TaskVector(tensors, meta)


def _files(folder: Path, count: int) -> list[Path]:
    return [_task_vector().save(folder / f"tv{i}.safetensors") for i in range(count)]


# --- check_arguments ------------------------------------------------------------------------------


def test_merge_mode_resolves_the_method_and_its_options_once() -> None:
    resolved = check_arguments("merge", 1.0, "grid", "score", {"variant": "diagonal"})
    assert isinstance(resolved, ResolvedMethod)
    assert resolved.method is get_method("score")
    assert resolved.options == {**get_method("score").defaults, "variant": "diagonal"}  # defaults filled in
    assert resolved.statistics == ()
    for method, statistic in (("esm", "activations"), ("regmean", "grams"), ("fisher", "fishers")):
        assert check_arguments("merge", "auto", "golden", method, {}).statistics == (statistic,)


def test_a_resolved_method_pickles_by_name() -> None:
    """ddp_spawn pickles the module: the registration (which holds a closure) travels by its name."""
    resolved = check_arguments("merge", 1.0, "grid", "regmean", {"reduce_non_diagonal": 0.5})
    for again in (pickle.loads(pickle.dumps(resolved)), copy.deepcopy(resolved)):
        assert again == resolved and again.method is get_method("regmean")
        assert again.options["reduce_non_diagonal"] == 0.5 and again.statistics == ("grams",)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "merge"])
def test_other_modes_run_no_method_so_none_is_looked_up(mode: str) -> None:
    assert check_arguments(mode, 0.5, "grid", "no such method", {"zz": 1}) is None


def test_modes_alpha_and_alpha_search_are_checked_in_every_mode() -> None:
    with pytest.raises(ValueError, match=r"mode='average' is not one of \['merge', 'zeroshot', 'ensemble', 'expert'\]"):
        check_arguments("average", 1.0, "grid", "score", {})
    for alpha in (0, 0.3, 2, "auto"):
        assert check_arguments("merge", alpha, "grid", "score", {}) is not None
    with pytest.raises(ValueError, match="alpha must be a number or 'auto', got 'best'"):
        check_arguments("zeroshot", "best", "grid", "score", {})
    with pytest.raises(ValueError, match=r"alpha_search='random' is not one of \['grid', 'golden'\]"):
        check_arguments("expert", 1.0, "random", "score", {})


def test_unknown_methods_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="Unknown merge method 'scor'. Registered methods: score,"):
        check_arguments("merge", 1.0, "grid", "scor", {})
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['zz'\] for merge method 'score'"):
        check_arguments("merge", 1.0, "grid", "score", {"zz": 1})
    with pytest.raises(ValueError, match="is not valid for merge method 'score'"):
        check_arguments("merge", 1.0, "grid", "score", {"variant": "halfway"})


@pytest.mark.parametrize(("method", "statistic"), [("esm", "activations"), ("regmean", "grams"), ("fisher", "fishers")])
def test_a_data_methods_statistics_given_as_options_are_refused(method: str, statistic: str) -> None:
    with pytest.raises(ValueError, match=rf"method_options\['{statistic}'\]: MergeModule collects '{method}'s"):
        check_arguments("merge", 1.0, "grid", method, {statistic: []})
    assert check_arguments("zeroshot", 1.0, "grid", method, {statistic: []}) is None  # no merge: nothing collected


# --- counts and loading ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "accepted", "refused"),
    [("merge", [1, 2, 5], [0]), ("ensemble", [1, 3], [0]), ("expert", [1], [0, 2]), ("zeroshot", [0, 1, 4], [])],
)
def test_each_mode_takes_its_number_of_task_vectors(mode: str, accepted: list[int], refused: list[int]) -> None:
    for count in accepted:
        check_count(mode, count)
    wanted = "exactly one task vector" if mode == "expert" else "at least one task vector"
    for count in refused:
        with pytest.raises(ValueError, match=rf"MergeModule\(mode='{mode}'\) needs {wanted}; got {count}"):
            check_count(mode, count)


def test_load_task_vectors_counts_then_loads_what_the_mode_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _files(tmp_path, 2)
    loaded = load_task_vectors(paths, "merge")
    assert [tv.path for tv in loaded] == paths and all(torch.equal(tv["w"], torch.ones(2, 3)) for tv in loaded)
    assert len(load_task_vectors(paths, "ensemble")) == 2 and len(load_task_vectors(paths[:1], "expert")) == 1
    with pytest.raises(ValueError, match="needs exactly one task vector; got 2"):
        load_task_vectors(paths, "expert")
    with pytest.raises(ValueError, match="needs at least one task vector; got 0"):
        load_task_vectors([], "merge")
    with caplog.at_level(logging.INFO):
        assert load_task_vectors([tmp_path / "never-read.safetensors"], "zeroshot") == []  # not even opened
    assert "ignores its task vectors" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing.safetensors' does not exist"):
        load_task_vectors([tmp_path / "missing.safetensors"], "merge")


def test_read_inputs_checks_every_task_vector_and_copies_theta0(tmp_path: Path) -> None:
    encoder = torch.nn.Linear(3, 2)
    state = encoder.state_dict()
    fingerprint = state_dict_fingerprint(state)
    path = TaskVector({"weight": torch.ones(2, 3)}, {"base_fingerprint": fingerprint}).save(tmp_path / "a.safetensors")
    inputs = read_inputs([path], "merge", encoder, BASE, fingerprint)
    assert [tv.path for tv in inputs.task_vectors] == [path]
    assert inputs.pretrained.keys() == state.keys() and all(torch.equal(inputs.pretrained[k], state[k]) for k in state)
    with torch.no_grad():
        encoder.weight.add_(1.0)
    assert not torch.equal(inputs.pretrained["weight"], encoder.weight)  # a copy, not the live parameters
    with pytest.raises(ValueError, match="made from different pre-trained weights"):
        read_inputs([path], "merge", encoder, BASE, "another fingerprint")


# --- check_base -----------------------------------------------------------------------------------


def test_the_base_they_were_made_from_is_accepted() -> None:
    check_base(_task_vector(), ENCODER, BASE, FINGERPRINT)
    check_base(_task_vector(fingerprint=None), ENCODER, BASE, FINGERPRINT)  # unrecorded: nothing to compare
    check_base(_task_vector(w=torch.ones(2, 3)), ENCODER, BASE, FINGERPRINT)  # a subset of the keys


def test_another_architecture_is_refused_naming_the_key() -> None:
    fix = "set model_name and pretrained to theirs"
    with pytest.raises(ValueError, match="different architecture") as error:
        check_base(_task_vector(extra=torch.ones(3)), ENCODER, BASE, FINGERPRINT)
    message = str(error.value)
    assert "task vector 'rot0' (fine-tuned from toy/theirs) is of a different architecture than toy/base" in message
    assert "its key 'extra' is not in this model's image encoder" in message and fix in message
    with pytest.raises(ValueError, match="different architecture") as error:
        check_base(_task_vector(w=torch.ones(3, 2)), ENCODER, BASE, FINGERPRINT)
    assert "'w' has shape [3, 2] there and [2, 3] here" in str(error.value) and fix in str(error.value)


def test_other_pretrained_weights_of_the_same_architecture_are_refused() -> None:
    other = state_dict_fingerprint({"w": torch.ones(2, 3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="was made from different pre-trained weights than toy/base") as error:
        check_base(_task_vector(fingerprint=other), ENCODER, BASE, FINGERPRINT)
    message = str(error.value)
    assert "(fine-tuned from toy/theirs)" in message and "of the same architecture" in message
    assert f"(base fingerprints {other[:20]}… vs {FINGERPRINT[:20]}…)" in message
    unrecorded = TaskVector({"w": torch.ones(2, 3)}, {"base_fingerprint": other})
    with pytest.raises(ValueError, match=r"an unnamed task vector \(fine-tuned from an unrecorded base model\)"):
        check_base(unrecorded, ENCODER, BASE, FINGERPRINT)


# --- check_held_out: a test domain an expert was fine-tuned on is not held out ----------------------------------


def _expert(folder: Path, domain: str | None, train_domains: list[str] | None = None) -> TaskVector:
    meta: dict = {"name": domain or "pooled"}
    if domain is not None:
        meta["domain"] = domain
    if train_domains is not None:
        meta["train_domains"] = train_domains
    return TaskVector.load(TaskVector({"w": torch.ones(2)}, meta).save(folder / f"{meta['name']}.safetensors"))


def test_an_expert_of_a_test_domain_is_refused_naming_the_domain_and_its_file(tmp_path: Path) -> None:
    experts = [_expert(tmp_path, "rot0", ["rot0"]), _expert(tmp_path, "rot30", ["rot30"])]
    assert check_held_out(experts, ["rot60"], allow=False) == []  # held out: nothing to say
    with pytest.raises(ValueError) as raised:
        check_held_out(experts, ["rot30", "rot60"], allow=False)
    message = str(raised.value)
    assert message.startswith(f"Target leakage: test domain 'rot30' is not held out: the task vector "
                              f"'{tmp_path / 'rot30.safetensors'}' was fine-tuned on it. ")  # fmt: skip
    assert "allow_target_experts=True (--model.allow_target_experts true)" in message and "rot60" not in message
    pooled = _expert(tmp_path, None, ["rot0", "rot30"])  # several domains: train_domains records them
    with pytest.raises(ValueError, match=r"test domain 'rot0' is not held out: the task vectors '.*rot0.safetensors' "
                                         r"and '.*pooled.safetensors' were fine-tuned on it"):  # fmt: skip
        check_held_out([*experts, pooled], ["rot0"], allow=False)


def test_allowed_target_experts_are_warned_about_and_returned_to_be_labelled(tmp_path: Path) -> None:
    experts = [_expert(tmp_path, "rot0"), _expert(tmp_path, "rot30")]
    with pytest.warns(UserWarning, match=r"test domain 'rot30' is not held out: the task vector '.*rot30.safetensors' "
                                         r"was fine-tuned on it; its metrics are named 'test/<domain> \(not held out\)"):  # fmt: skip
        assert check_held_out(experts, ["rot30", "rot60"], allow=True) == ["rot30"]
    assert expert_domains(_expert(tmp_path, None)) == []  # an expert that records no domain: nothing to check


def test_held_out_checks_the_modes_that_combine_experts_when_a_stage_tests(tmp_path: Path) -> None:
    experts = [_expert(tmp_path, "rot30")]
    data = SimpleNamespace(test_domains=["rot30"])  # a TestDomains datamodule
    for mode in ("merge", "ensemble"):
        for stage in ("test", "predict"):
            with pytest.raises(ValueError, match="test domain 'rot30' is not held out"):
                held_out(experts, mode, stage, data, allow=False)
    assert held_out(experts, "merge", "validate", data, allow=False) == []  # validation reads the sources only
    assert held_out(experts, "expert", "test", data, allow=False) == []  # the one-expert reference row
    assert held_out(experts, "merge", "test", object(), allow=False) == []  # a datamodule that names no test domain
