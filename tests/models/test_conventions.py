"""The paper's matrix convention: the same experts merge to the same model whichever library holds them.

The experts are random task vectors of the tiny open_clip tower's keys and shapes, with a shared low-rank part so
that the tasks' subspaces overlap as fine-tuned experts' do. Each is converted to transformers' and timm's state
dict (:mod:`lightning_score.models.convert`), put in the matrix convention, merged, put back and converted to
open_clip's keys: equal to the open_clip merge in every data-free SVD method of the registry.
"""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from torch import Tensor

import lightning_score.models  # noqa: F401  (registers the tiny configs)
from lightning_score.merging import list_methods, merge_task_vectors
from lightning_score.merging.registry import get_method
from lightning_score.models.conventions import from_matrix_convention, to_matrix_convention
from lightning_score.models.convert import convert_state_dict
from lightning_score.task_vector import TaskVector

NUM_TASKS = 3
SVD_METHODS = [n for n in list_methods() if get_method(n).scope == "matrix" and not get_method(n).needs_data]
CASES = [
    *((m, {"sign_convention": "canonical"}) for m in SVD_METHODS if m == "score"),
    *(("score", {"variant": v, "sign_convention": "canonical"}) for v in ("diagonal", "off_diagonal", "full")),
    ("score", {}),
    *((m, {}) for m in SVD_METHODS if m != "score"),
    ("cart", {"all_matrices": True}),
]


def _experts(seed: int = 0) -> list[dict[str, Tensor]]:
    shapes = {k: v.shape for k, v in open_clip.create_model("tiny-ViT-W64-L2").visual.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    shared = {k: draw(s[0], 2) @ draw(2, s[1]) if len(s) == 2 else draw(*s) for k, s in shapes.items()}
    return [{k: 0.01 * (shared[k] + draw(*s)) for k, s in shapes.items()} for _ in range(NUM_TASKS)]


def _merge(task_vectors: list[dict[str, Tensor]], method: str, options: dict) -> dict[str, Tensor]:
    return dict(merge_task_vectors(task_vectors, method, device="cpu", **options))


def _through(backbone: str, experts: list[dict[str, Tensor]], method: str, options: dict, qkv: str) -> dict:
    """Convert the open_clip experts to ``backbone``, merge in the matrix convention, convert the result back."""
    held = [convert_state_dict(tv, "open_clip", backbone) for tv in experts]
    merged = _merge([to_matrix_convention(tv, backbone, qkv=qkv) for tv in held], method, options)
    return convert_state_dict(from_matrix_convention(merged, backbone, qkv=qkv), backbone, "open_clip")


def _relative(a: dict[str, Tensor], b: dict[str, Tensor], keys: list[str]) -> float:
    num = sum(float((a[k] - b[k]).square().sum()) for k in keys)
    return (num / sum(float(b[k].square().sum()) for k in keys)) ** 0.5


@pytest.fixture(scope="module")
def experts() -> list[dict[str, Tensor]]:
    return _experts()


@pytest.mark.parametrize("backbone", ["hf", "timm"])
@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_the_same_experts_merge_to_the_same_model_on_every_backbone(backbone, method, options, experts) -> None:
    expected = _merge(experts, method, options)
    got = _through(backbone, experts, method, options, qkv="fused")
    assert list(got) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"{backbone} {method} {key}")


@pytest.mark.parametrize("backbone", ["open_clip", "hf", "timm"])
def test_split_qkv_is_the_same_merge_on_every_backbone(backbone, experts) -> None:
    options = {"sign_convention": "canonical"}
    reference = _through("hf", experts, "score", options, qkv="split")  # transformers' own q/k/v keys
    got = _through(backbone, experts, "score", options, qkv="split")
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"{backbone} {key}")


@pytest.mark.parametrize(
    ("method", "options"), [("score", {"sign_convention": "canonical"}), ("tsv", {}), ("iso_c", {})]
)
def test_split_qkv_is_another_merge(method, options, experts, caplog) -> None:
    """FusionBench's per-matrix q/k/v (transformers' keys as they are) gives another merged attention."""
    fused = _merge(experts, method, options)
    split = _through("hf", experts, method, options, qkv="split")
    qkv = [k for k in fused if k.endswith("attn.in_proj_weight")]
    difference = _relative(split, fused, qkv)
    logging.getLogger(__name__).info("%s: split vs fused q/k/v differ by %.1f %%", method, 100 * difference)
    assert difference > 0.1, f"{method}: split and fused q/k/v merges differ by only {difference:.2%}"
    others = [k for k in fused if "in_proj" not in k]
    assert _relative(split, fused, others) < 1e-6  # the rest of the tower is the same merge


def test_without_the_convention_timm_merges_its_positional_embedding_as_no_matrix(experts) -> None:
    """timm's 3-D pos_embed is no matrix to the SVD methods: merged raw it gets the mean, not SCORE's merge."""
    options = {"sign_convention": "canonical"}
    expected = _merge(experts, "score", options)["positional_embedding"]
    raw = _merge([convert_state_dict(tv, "open_clip", "timm") for tv in experts], "score", options)
    got = raw["pos_embed"].squeeze(0)
    mean = torch.stack([tv["positional_embedding"] for tv in experts]).mean(0)
    torch.testing.assert_close(got, mean)
    assert float((got - expected).norm() / expected.norm()) > 0.1


@pytest.mark.parametrize(
    ("method", "options", "equivariant"),
    [
        ("score", {"sign_convention": "canonical"}, False),
        ("iso_cts", {}, False),
        ("tsv", {}, True),
        ("iso_c", {}, True),
        ("score", {"variant": "full"}, True),
        ("score", {"variant": "diagonal", "sign_convention": "canonical"}, True),
        ("cart", {"all_matrices": True}, True),
    ],
)
def test_which_methods_merge_a_transposed_matrix_to_the_transposed_merge(method, options, equivariant) -> None:
    """Why the convention gives transformers' and timm's projection transposed (as open_clip's ``proj``).

    On independent (well-conditioned) task matrices, so that float rounding stays far below the threshold, and 4
    tasks, a divisor of r = 32: with T·⌊r/T⌋ < r, TSV's and SCORE's polar factors complete the empty slots with
    an arbitrary basis, and no method of the shared basis is transpose-equivariant (score ``full``: 18 % with 3).
    """
    generator = torch.Generator().manual_seed(3)
    proj = [{"proj": torch.randn(64, 32, generator=generator)} for _ in range(4)]
    transposed = [{"proj": tv["proj"].T.contiguous()} for tv in proj]
    a = _merge(proj, method, options)["proj"]
    b = _merge(transposed, method, options)["proj"].T
    difference = float((a - b).norm() / a.norm())
    logging.getLogger(__name__).info("%s %s: transposed merge differs by %.2e", method, options, difference)
    assert (difference < 1e-4) if equivariant else (difference > 1e-2), difference


def test_the_convention_refuses_a_bad_qkv_and_a_block_without_all_of_q_k_v() -> None:
    with pytest.raises(ValueError, match="qkv='joint'.*'fused'.*'split'"):
        to_matrix_convention({}, "hf", qkv="joint")
    partial = {f"vision_model.encoder.layers.2.self_attn.{p}_proj.weight": torch.ones(2, 2) for p in "qv"}
    with pytest.raises(
        ValueError, match=r"fuses with \['vision_model\.encoder\.layers\.2\.self_attn\.k_proj\.weight'\]"
    ):
        to_matrix_convention(partial, "hf")
    with pytest.raises(ValueError, match="Unknown backbone 'jax'"):
        from_matrix_convention({}, "jax")


@pytest.mark.parametrize("backbone", ["open_clip", "hf", "timm"])
@pytest.mark.parametrize("qkv", ["fused", "split"])
def test_the_convention_round_trips_exactly(backbone, qkv, experts) -> None:
    held = convert_state_dict(experts[0], "open_clip", backbone)
    matrices = to_matrix_convention(held, backbone, qkv=qkv)
    assert all(v.ndim <= 2 for k, v in matrices.items() if "embed" in k and "patch" not in k)
    back = from_matrix_convention(matrices, backbone, qkv=qkv)
    assert list(back) == list(held)
    assert all(torch.equal(back[k], v) and back[k].shape == v.shape for k, v in held.items())


def test_task_vectors_of_hf_weights_on_disk_merge_as_the_open_clip_ones(tmp_path) -> None:
    """Experts held as transformers weights: their task vectors (saved, loaded lazily) merge to the open_clip merge."""
    base = open_clip.create_model("tiny-ViT-W64-L2").visual.state_dict()
    tuned = [{k: v + d for (k, v), d in zip(base.items(), tv.values(), strict=True)} for tv in _experts(seed=4)]
    theirs, ours = [], []
    for t, weights in enumerate(tuned):
        hf_tv = TaskVector.from_state_dicts(
            convert_state_dict(base, "open_clip", "hf"), convert_state_dict(weights, "open_clip", "hf"), name=f"e{t}"
        )
        theirs.append(TaskVector.load(hf_tv.save(tmp_path / f"hf-{t}.safetensors")))
        ours.append(TaskVector.from_state_dicts(base, weights, name=f"e{t}"))
    options = {"sign_convention": "canonical"}
    merged = _merge([to_matrix_convention(tv, "hf") for tv in theirs], "score", options)
    got = convert_state_dict(from_matrix_convention(merged, "hf"), "hf", "open_clip")
    for key, value in _merge(ours, "score", options).items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
