"""Which keys the analysis reads, in which order, and the errors for bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_score import TaskVector
from lightning_score.analysis import (
    depth_key,
    key_alignment,
    singular_spectra,
    subspace_alignment,
)
from tests.analysis.reference import model, tasks

# --- bad inputs -----------------------------------------------------------------------------------


def test_empty_and_non_sequence_inputs() -> None:
    with pytest.raises(ValueError, match="subspace_alignment got an empty list"):
        subspace_alignment([])
    with pytest.raises(ValueError, match="singular_spectra got an empty list"):
        singular_spectra([])
    with pytest.raises(ValueError, match="Wrap a single task vector in a list"):
        subspace_alignment(model(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a mapping"):
        subspace_alignment([model(0), 3])  # type: ignore[list-item]


def test_mismatched_task_vectors_reuse_the_engines_messages() -> None:
    a, b = model(0), model(1)
    del b["proj"]
    with pytest.raises(ValueError, match="different keys"):
        subspace_alignment([a, b])
    c = model(1)
    c["proj"] = torch.randn(6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="Key 'proj' has shape"):
        subspace_alignment([a, c])
    d = {k: v.float() for k, v in model(1).items()}
    with pytest.raises(ValueError, match="dtype"):
        subspace_alignment([a, d])
    x = TaskVector(model(0), {"name": "x", "base_fingerprint": "blake2b:aaa"})
    y = TaskVector(model(1), {"name": "y", "base_fingerprint": "blake2b:bbb"})
    with pytest.raises(ValueError, match="different pre-trained weights"):
        singular_spectra([x, y])


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.9", None])
def test_energy_outside_the_unit_interval(energy: object) -> None:
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        subspace_alignment(tasks(), energy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="energy must be"):
        key_alignment(torch.randn(2, 3, 3), energy)  # type: ignore[arg-type]


def test_no_matrix_keys_and_bad_key_requests() -> None:
    only_vectors = [{"b": torch.randn(4), "conv": torch.randn(2, 3, 2, 2)} for _ in range(2)]
    with pytest.raises(ValueError, match="No matrix keys selected"):
        subspace_alignment(only_vectors)
    with pytest.raises(ValueError, match="No matrix keys selected.*prefix='visual.'"):
        singular_spectra(tasks(), prefix="visual.")
    with pytest.raises(ValueError, match=r"not in the task vectors, e\.g\. \['nope'\]"):
        subspace_alignment(tasks(), keys=["proj", "nope"])
    with pytest.raises(ValueError, match="'transformer.resblocks.0.attn.in_proj_bias' .* is not a matrix key"):
        subspace_alignment(tasks(), keys=["transformer.resblocks.0.attn.in_proj_bias"])
    with pytest.raises(ValueError, match="'text_projection' .* is not a matrix key"):
        subspace_alignment(tasks(), keys="text_projection")


def test_other_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        subspace_alignment(tasks(), dtype=torch.float16)
    for top in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top must be a positive integer"):
            singular_spectra(tasks(), top=top)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[T, m, n\]"):
        key_alignment(torch.randn(3, 3))
    with pytest.raises(ValueError, match="floating-point"):
        key_alignment(torch.ones(2, 3, 3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_key_and_the_file(bad: float, tmp_path: Path) -> None:
    broken = model(2)
    broken["transformer.resblocks.1.mlp.c_fc.weight"][3, 3] = bad
    path = TaskVector(broken, {"name": "d2"}).save(tmp_path / "d2.safetensors")
    tvs = [model(0), model(1), TaskVector.load(path)]
    with pytest.raises(ValueError, match=r"Key 'transformer.resblocks.1.mlp.c_fc.weight' of task 2 .*d2.safetensors"):
        subspace_alignment(tvs)


def test_keys_come_out_in_depth_order_whatever_the_input_order() -> None:
    g = torch.Generator().manual_seed(5)
    names = [f"transformer.resblocks.{b}.mlp.c_fc.weight" for b in range(12)]
    scrambled = [names[i] for i in (11, 2, 10, 0, 1, 9, 3, 8, 4, 7, 5, 6)]
    tv = {k: torch.randn(4, 3, generator=g, dtype=torch.float64) for k in scrambled}
    assert subspace_alignment([tv]).keys == names
    assert singular_spectra([tv]).keys == names
    vit = ["proj", "positional_embedding", "class_embedding", "conv1.weight", *scrambled, "ln_post.weight"]
    assert sorted(vit, key=depth_key) == [
        "class_embedding",
        "positional_embedding",
        *names,
        "conv1.weight",
        "ln_post.weight",
        "proj",
    ]
