"""keys: which keys are matrices for the SVD-based methods, which are a block's linear layers, and the device."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging.keys import is_block_linear, is_matrix_key, resolve_device

BLOCK = "transformer.resblocks.4"


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        (f"{BLOCK}.attn.in_proj_weight", (2304, 768), True),
        (f"{BLOCK}.attn.out_proj.weight", (768, 768), True),
        (f"{BLOCK}.mlp.c_fc.weight", (3072, 768), True),
        (f"{BLOCK}.mlp.c_proj.weight", (768, 3072), True),
        ("positional_embedding", (50, 768), True),
        ("proj", (768, 512), True),
        ("text_projection", (512, 512), False),  # 2-D, but the text tower's projection is excluded by name
        ("transformer.text_projection.weight", (512, 512), False),
        (f"{BLOCK}.attn.in_proj_bias", (2304,), False),
        ("conv1.weight", (768, 3, 32, 32), False),
        ("class_embedding", (768,), False),
        ("logit_scale", (), False),
    ],
)
def test_is_matrix_key(key: str, shape: tuple[int, ...], expected: bool) -> None:
    assert is_matrix_key(key, shape) is expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"{BLOCK}.attn.in_proj_weight", True),
        (f"{BLOCK}.attn.out_proj.weight", True),
        (f"{BLOCK}.mlp.c_fc.weight", True),
        (f"{BLOCK}.mlp.c_proj.weight", True),
        (f"{BLOCK}.attn.out_proj.bias", False),
        (f"{BLOCK}.ln_1.weight", False),
        ("positional_embedding", False),
        ("proj", False),
    ],
)
def test_is_block_linear(key: str, expected: bool) -> None:
    assert is_block_linear(key) is expected


def test_resolve_device_takes_the_given_one_as_a_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named, not checked: no device is touched


@pytest.mark.parametrize("available", [False, True])
def test_resolve_device_defaults_to_cuda_when_available(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert resolve_device(None) == torch.device("cuda" if available else "cpu")
