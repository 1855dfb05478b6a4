"""The built-in benchmarks' registry: one prefix, lookup by token or name, the model layer attaching the base."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_score.data.builtin as builtin
import lightning_score.models
from lightning_score.data import DomainDataModule
from lightning_score.data.builtin import (
    BUILTIN_PREFIX,
    Builtin,
    builtin_name,
    get_builtin,
    list_builtins,
    register_base,
)
from lightning_score.data.digits import materialise_rotated_digits
from lightning_score.models import build_clip
from lightning_score.models.digits_base import build_digits_base

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = "Unknown built-in 'builtin:nope'; available: "


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Builtin]:
    """A private copy of the registry, so registrations in a test do not outlive it."""
    copy = dict(builtin._BUILTINS)
    monkeypatch.setattr(builtin, "_BUILTINS", copy)
    return copy


def test_builtin_name_reads_the_prefix_known_or_not() -> None:
    assert BUILTIN_PREFIX == "builtin:"
    assert builtin_name("builtin:digits") == "digits"
    assert builtin_name("builtin:nope") == "nope"  # unknown names are the registry's to refuse
    for value in (None, "digits", "/data/PACS", "Builtin:digits", " builtin:digits", "openai"):
        assert builtin_name(value) is None


def test_list_builtins_gives_tokens_that_get_builtin_resolves() -> None:
    tokens = list_builtins()
    assert "builtin:digits" in tokens
    for token in tokens:
        assert token.startswith(BUILTIN_PREFIX) and get_builtin(token).name == builtin_name(token)


def test_get_builtin_by_token_and_by_name() -> None:
    digits = get_builtin("builtin:digits")
    assert get_builtin("digits") is digits
    assert digits.name == "digits" and digits.templates == "digits"
    assert digits.materialise is materialise_rotated_digits


@pytest.mark.parametrize("value", ["builtin:nope", "nope"])
def test_an_unknown_builtin_is_refused_listing_the_builtins(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        get_builtin(value)
    assert str(caught.value) == f"{UNKNOWN}{list_builtins()}."


def test_register_base_replaces_only_the_base(registry: dict[str, Builtin]) -> None:
    before, names = get_builtin("digits"), list(registry)

    def other_base(model_name: str) -> Path:
        return Path(f"/weights/{model_name}.safetensors")

    register_base("digits", other_base)
    after = get_builtin("digits")
    assert after.base is other_base
    assert (after.name, after.materialise, after.templates) == (before.name, before.materialise, before.templates)
    assert before.base is build_digits_base  # the earlier entry is not mutated (frozen, replaced)
    assert list(registry) == names  # no entry added or dropped


def test_register_base_keeps_every_other_field_of_an_entry(registry: dict[str, Builtin]) -> None:
    def materialise() -> Path:
        return Path("/cache/toy")

    registry["toy"] = Builtin("toy", materialise, "toy-prompts")  # every field differs from the others
    register_base("toy", build_digits_base)
    assert get_builtin("builtin:toy") == Builtin("toy", materialise, "toy-prompts", build_digits_base)
    assert get_builtin("digits") is registry["digits"]  # the other entries untouched


def test_register_base_of_an_unknown_builtin_is_refused_and_adds_nothing(registry: dict[str, Builtin]) -> None:
    names = list(registry)
    with pytest.raises(ValueError, match=r"Unknown built-in 'builtin:nope'"):
        register_base("nope", lambda model_name: Path(model_name))
    assert list(registry) == names


def test_importing_the_models_registers_the_digits_base() -> None:
    assert get_builtin("digits").base is lightning_score.models.digits_base.build_digits_base


def test_the_data_layer_alone_registers_no_base() -> None:
    code = (
        "import sys; import lightning_score.data.builtin as b; "
        "print(b.get_builtin('digits').base is None, 'lightning_score.models' in sys.modules); "
        "import lightning_score.models; print(b.get_builtin('digits').base.__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.split("\n")[:2] == ["True False", "build_digits_base"], run.stderr


def test_a_datamodule_of_an_unknown_builtin_fails_with_the_registrys_message() -> None:
    with pytest.raises(ValueError) as caught:
        _ = DomainDataModule("builtin:nope").domains
    assert str(caught.value) == f"{UNKNOWN}{list_builtins()}."


def test_build_clip_of_an_unknown_builtin_fails_with_the_registrys_message() -> None:
    with pytest.raises(ValueError) as caught:
        build_clip("tiny-ViT-W64-L2", pretrained="builtin:nope")
    assert str(caught.value) == f"{UNKNOWN}{list_builtins()}."
