"""registry: one registration per method, its options listed, filled, type-checked once, and built from that."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import pytest
import torch
from torch import Tensor

from lightning_score.merging import merge_task_vectors, registry
from lightning_score.merging.registry import KeyMerger, KeyStream, MethodSpec, get_method, list_methods, register_method


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test registers into a copy of the registry: the real one stays as it is."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def _register_scaled() -> MethodSpec:
    @register_method("scaled", reference="A test (2026)", choices={"mode": ["mean", "sum"]})
    def scaled(
        deltas: Tensor, *, factor: float = 1.0, steps: int = 1, flag: bool = False, mode: str = "mean", tag: str = "x"
    ) -> Tensor:
        """Scaled mean or sum of the tasks.

        More text that is not the summary.
        """
        merged = deltas.mean(dim=0) if mode == "mean" else deltas.sum(dim=0)
        return merged * factor * steps * (2 if flag else 1)

    return get_method("scaled")


# --- registration -------------------------------------------------------------------------------------


def test_a_function_is_registered_with_its_options_summary_and_choices() -> None:
    spec = _register_scaled()
    assert list_methods()[-1] == "scaled"
    assert dict(spec.defaults) == {"factor": 1.0, "steps": 1, "flag": False, "mode": "mean", "tag": "x"}
    assert spec.summary == "Scaled mean or sum of the tasks." and spec.reference == "A test (2026)"
    assert spec.choices == {"mode": ("mean", "sum")} and spec.scope == "matrix" and spec.shardable
    assert not spec.needs_data


def test_a_key_merger_class_gives_its_init_options_and_shardable() -> None:
    @register_method("whole_model", reference="ref", scope="all", needs_data=True)
    class WholeModel(KeyMerger):
        """Needs every key."""

        shardable = False

        def __init__(self, *, weight: float = 0.5) -> None:
            self.weight = weight

        def merge_key(self, key: str, deltas: Tensor) -> Tensor:
            return deltas.sum(dim=0) * self.weight

        def finalize(self, merged: MutableMapping[str, Tensor]) -> None:
            pass

    spec = get_method("whole_model")
    assert dict(spec.defaults) == {"weight": 0.5} and spec.scope == "all" and spec.needs_data and not spec.shardable
    merger = spec.build(spec.resolve_options({"weight": 2.0}))
    assert isinstance(merger, WholeModel) and merger.weight == 2.0


def test_a_duplicate_name_is_refused() -> None:
    _register_scaled()
    with pytest.raises(ValueError, match="A merge method named 'scaled' is already registered"):
        _register_scaled()
    with pytest.raises(ValueError, match="'score' is already registered"):
        register_method("score", reference="again")(lambda deltas: deltas.mean(0))


@pytest.mark.parametrize("name", ["Score", "my-method", "1st", "two words", ""])
def test_the_name_must_be_a_lower_case_identifier(name: str) -> None:
    with pytest.raises(ValueError, match=rf"Method name {name!r} must be a lower-case identifier"):
        register_method(name, reference="ref")


def test_an_option_without_a_default_and_a_non_callable_are_refused() -> None:
    def needs_value(deltas: Tensor, *, rate: float) -> Tensor:
        return deltas.mean(0) * rate

    with pytest.raises(TypeError, match="Option 'rate' of merge method needs_value needs a default value"):
        register_method("needs_value", reference="ref")(needs_value)
    with pytest.raises(TypeError, match="Cannot register 3: expected a function or a KeyMerger subclass"):
        register_method("number", reference="ref")(3)
    assert "needs_value" not in list_methods() and "number" not in list_methods()


def test_choices_for_an_unknown_option_are_refused() -> None:
    with pytest.raises(ValueError, match=r"choices given for unknown option\(s\) \['colour'\] of 'odd'"):
        register_method("odd", reference="ref", choices={"colour": ["red"]})(lambda deltas, *, size=1: deltas[0])


def test_factors_is_not_an_option_and_is_passed_only_when_given() -> None:
    seen: list[object] = []

    @register_method("factored", reference="ref")
    def factored(deltas: Tensor, *, scale: float = 1.0, factors: object = None) -> Tensor:
        seen.append(factors)
        return deltas.mean(dim=0) * scale

    spec = get_method("factored")
    assert dict(spec.defaults) == {"scale": 1.0}
    merger = spec.build(spec.resolve_options({}))
    assert merger.factorized_keys(["a", "b"]) == ["a", "b"]
    merger.merge_key("a", torch.ones(2, 3))
    merger.merge_key("a", torch.ones(2, 3), factors="the factors")  # type: ignore[call-arg]
    assert seen == [None, "the factors"]
    plain = _register_scaled().build(get_method("scaled").resolve_options({}))
    assert plain.factorized_keys(["a"]) == []


# --- resolve_options --------------------------------------------------------------------------------------


def test_defaults_are_filled_and_the_input_is_left_alone() -> None:
    spec = _register_scaled()
    given = {"steps": 3}
    resolved = spec.resolve_options(given)
    assert resolved == {"factor": 1.0, "steps": 3, "flag": False, "mode": "mean", "tag": "x"}
    assert given == {"steps": 3} and resolved is not given


def test_an_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"Unknown option\(s\) \['size', 'zeta'\] for merge method 'scaled'\. Valid options: factor=1\.0, "
        r"steps=1, flag=False, mode='mean', tag='x'\.",
    ):
        _register_scaled().resolve_options({"zeta": 1, "size": 2, "steps": 2})


@pytest.mark.parametrize(
    ("option", "value", "kind"),
    [
        ("factor", "2", "a finite number"),
        ("factor", True, "a finite number"),
        ("factor", float("nan"), "a finite number"),
        ("factor", float("inf"), "a finite number"),
        ("steps", 1.5, "an integer"),
        ("steps", False, "an integer"),
        ("flag", 1, "True or False"),
        ("tag", 3, "a string"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(option: str, value: object, kind: str) -> None:
    with pytest.raises(ValueError, match=rf"Option {option}=.* of merge method 'scaled' must be {kind}\."):
        _register_scaled().resolve_options({option: value})


def test_numbers_of_a_compatible_type_are_accepted_as_given() -> None:
    resolved = _register_scaled().resolve_options({"factor": 2, "steps": 4})
    assert resolved["factor"] == 2 and type(resolved["factor"]) is int and resolved["steps"] == 4


def test_a_value_outside_the_choices_lists_them() -> None:
    spec = _register_scaled()
    with pytest.raises(ValueError, match=r"mode='max' is not valid for merge method 'scaled'; choose one of \['mean'"):
        spec.resolve_options({"mode": "max"})
    assert spec.resolve_options({"mode": "sum"})["mode"] == "sum"


def test_get_method_lists_the_registered_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown merge method 'nope'\. Registered methods: score, .*tsv"):
        get_method("nope")


# --- build: from resolved options, never resolving them again ------------------------------------------------


def test_build_uses_the_resolved_options_without_resolving_them_again(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _register_scaled()
    resolved = spec.resolve_options({"factor": 3.0, "mode": "sum"})
    calls: list[dict] = []
    original = MethodSpec.resolve_options

    def spy(self: MethodSpec, options: dict) -> dict:
        calls.append(dict(options))
        return original(self, options)

    monkeypatch.setattr(MethodSpec, "resolve_options", spy)
    merger = spec.build(resolved)
    assert calls == []
    assert torch.equal(merger.merge_key("w", torch.ones(2, 3)), torch.full((3,), 6.0))
    assert spec.build(resolved) is not merger  # a fresh merger for every run


def test_merge_task_vectors_resolves_the_options_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict]] = []
    original = MethodSpec.resolve_options

    def spy(self: MethodSpec, options: dict) -> dict:
        calls.append((self.name, dict(options)))
        return original(self, options)

    monkeypatch.setattr(MethodSpec, "resolve_options", spy)
    merged = merge_task_vectors([{"w": torch.randn(4, 3)} for _ in range(2)], "score", device="cpu", z=2.5)
    assert calls == [("score", {"z": 2.5})]
    assert merged.metadata["merge"]["options"] == get_method("score").resolve_options({"z": 2.5})


def test_build_refuses_options_that_were_not_resolved() -> None:
    spec = _register_scaled()
    with pytest.raises(
        ValueError,
        match=r"build of merge method 'scaled' takes the options resolve_options returned \(missing \['flag', 'mode', "
        r"'steps', 'tag'\], unknown \['zeta'\]\): call spec\.build\(spec\.resolve_options\(options\)\)",
    ):
        spec.build({"factor": 1.0, "zeta": 2})
    with pytest.raises(TypeError, match="has no factory: make merge methods with register_method"):
        MethodSpec(name="bare", reference="", summary="", scope="matrix", defaults={}).build({})


# --- KeyStream ---------------------------------------------------------------------------------------------


def test_key_stream_reads_each_key_again_on_every_pass() -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(8.0).reshape(2, 2, 2)}
    reads: list[str] = []

    def load(key: str) -> Tensor:
        reads.append(key)
        return tensors[key]

    stream = KeyStream(["a", "b"], load, {"a": (3,), "b": (2, 2)}, num_tasks=2)
    assert len(stream) == 2 and stream.numel() == 7 and reads == []  # numel from the shapes, nothing read
    assert [key for key, _ in stream] == ["a", "b"] and [key for key, _ in stream] == ["a", "b"]
    assert reads == ["a", "b", "a", "b"]
    flat = list(stream.flat(torch.neg))
    assert [tuple(chunk.shape) for chunk in flat] == [(2, 3), (2, 4)] and torch.equal(flat[1][1], -torch.arange(4.0, 8))
    doubled = stream.map(lambda key, deltas: deltas * 2)
    assert torch.equal(dict(iter(doubled))["b"], tensors["b"] * 2) and doubled.shapes == stream.shapes


def test_a_method_spec_pickles_by_name_to_the_registered_one() -> None:
    """ddp_spawn pickles a MergeModule with its resolved method: the spec (whose factory is a closure) travels by name."""
    import pickle

    for name in list_methods():
        assert pickle.loads(pickle.dumps(get_method(name))) is get_method(name)
