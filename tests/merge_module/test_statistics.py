"""The data-using methods through MergeModule: each method's statistics from source images only, as defined.

The references are computed here: the block inputs by a float64 forward written with plain tensor
operations (``reference_vit``), the Fisher by float64 autograd one image and one class at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_score import DomainDataModule, MergeModule, TaskVector
from lightning_score.data.images import ImageListDataset
from lightning_score.merge_module.statistics import STATISTICS, statistic_options
from lightning_score.merging import merge_task_vectors
from lightning_score.models import build_clip
from tests.experts import MODEL, QUIET
from tests.merge_module.reference_vit import gram, vit_forward

SOURCES, TARGET = ["rot0", "rot60"], "rot30"
HEADS = 2  # tiny-ViT-W64-L2: width 64, head width 32
LINEAR = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class RecordingData(DomainDataModule):
    """The digits, remembering which domains the proxy loaders were asked for and when the test began."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("builtin:digits", num_workers=0, batch_size=64, **kwargs)
        self.proxy_calls: list[tuple[str, int]] = []
        self.testing = False

    def proxy_dataloader(self, domain: str, num_images: int = 32, batch_size: int | None = None) -> Any:
        self.proxy_calls.append((domain, num_images))
        return super().proxy_dataloader(domain, num_images, batch_size)

    def test_dataloader(self) -> Any:
        self.testing = True
        return super().test_dataloader()


class SpyMerge(MergeModule):
    """Keeps the statistics the merge was given."""

    def collect_statistics(self, device: torch.device | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
        self.seen = super().collect_statistics(device)
        return self.seen


@pytest.fixture()
def image_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image file any dataset reads during the test."""
    reads: list[str] = []
    original = ImageListDataset.__getitem__

    def reading(self: ImageListDataset, index: int) -> Any:
        reads.append(str(self.samples[index][0]))
        return original(self, index)

    monkeypatch.setattr(ImageListDataset, "__getitem__", reading)
    return reads


def _merge(method: str, quick_base: Path, paths: list[str], images: int, precision: str = "32-true") -> tuple:
    data = RecordingData(train_domains=SOURCES, test_domains=[TARGET])
    module = SpyMerge(
        MODEL, str(quick_base), task_vectors=paths, method=method, proxy_images=images, templates="digits"
    )
    results = L.Trainer(precision=precision, **QUIET).test(module, datamodule=data, verbose=False)[0]
    assert f"test/{TARGET}/acc" in results
    return module, data


def _expert_state(quick_base: Path, path: str) -> dict[str, torch.Tensor]:
    base = build_clip(MODEL, str(quick_base)).model.visual.state_dict()
    tv = TaskVector.load(path)
    return {k: base[k].double() + tv[k].double() if k in tv else base[k].double() for k in base}


def _proxy_images(domain: str, count: int) -> torch.Tensor:
    """The images MergeModule's proxy loader gives (same seeded sample, open_clip's evaluation transform)."""
    transform = build_clip(MODEL, None).val_transform
    data = DomainDataModule(
        "builtin:digits", train_domains=SOURCES, test_domains=[TARGET], num_workers=0, val_transform=transform
    )
    return torch.cat(list(data.proxy_dataloader(domain, count)))


def _quick_gelu(quick_base: Path) -> bool:
    visual = build_clip(MODEL, str(quick_base)).model.visual
    return type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def _assert_source_only(data: RecordingData, reads: list[str], images: int) -> None:
    """The merge (in setup, before the test loop) read only the sources' validation (here: test-split) images."""
    assert sorted(data.proxy_calls) == sorted((d, images) for d in SOURCES)  # each source once, the target never
    count = images * len(SOURCES)
    merge, test = [Path(p) for p in reads[:count]], [Path(p) for p in reads[count:]]
    assert {p.parts[-3] for p in merge} == set(SOURCES) and all(p.parts[-4] == "test" for p in merge), merge[:3]
    assert test and all(p.parts[-3] == TARGET for p in test)  # then the test loop: the target's images only


def test_each_data_method_declares_its_statistic_through_its_options() -> None:
    assert statistic_options("esm") == ("activations",)
    assert statistic_options("regmean") == ("grams",)
    assert statistic_options("fisher") == ("fishers",)
    assert statistic_options("score") == () and set(STATISTICS) == {"activations", "grams", "fishers"}


def test_the_reference_forward_is_the_encoders(quick_base: Path) -> None:
    encoder = build_clip(MODEL, str(quick_base)).model.visual.double().eval()
    images = _proxy_images("rot0", 3)
    features, inputs = vit_forward(encoder.state_dict(), images, HEADS, _quick_gelu(quick_base))
    with torch.no_grad():
        torch.testing.assert_close(features, encoder(images.double()), rtol=1e-9, atol=1e-9)
    assert len(inputs) == 2 * len(LINEAR)


def test_out_proj_inputs_are_what_the_attention_projects(quick_base: Path) -> None:
    from lightning_score.merge_module.layer_inputs import record_layer_inputs

    encoder = build_clip(MODEL, str(quick_base)).model.visual.eval()
    key = "transformer.resblocks.1.attn.out_proj.weight"
    attention = encoder.transformer.resblocks[1].attn
    seen: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []
    handle = attention.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
    with torch.no_grad(), record_layer_inputs(encoder, [key], lambda k, rows: seen.__setitem__(k, rows)):
        encoder(_proxy_images("rot0", 4))
    handle.remove()
    projected = seen[key] @ attention.out_proj.weight.T + attention.out_proj.bias
    torch.testing.assert_close(projected, outputs[0].reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_regmean_grams_come_from_source_images_and_give_the_merge(
    quick_base: Path, expert_task_vectors: dict, image_reads: list[str]
) -> None:
    paths = [str(expert_task_vectors[d]) for d in SOURCES]
    module, data = _merge("regmean", quick_base, paths, images=16)
    _assert_source_only(data, image_reads, 16)
    grams = module.seen["grams"]
    keys = {f"transformer.resblocks.{b}.{name}" for b in range(2) for name in LINEAR}
    assert list(module.seen) == ["grams"] and len(grams) == 2 and all(set(g) == keys for g in grams)
    reference = []
    for domain, path, collected in zip(SOURCES, paths, grams, strict=True):
        _, inputs = vit_forward(
            _expert_state(quick_base, path), _proxy_images(domain, 16), HEADS, _quick_gelu(quick_base)
        )
        reference.append({k: gram(inputs[k]) for k in keys})
        for key in keys:
            width = 256 if key.endswith("c_proj.weight") else 64
            assert collected[key].shape == (width, width) and collected[key].dtype == torch.float32
            assert torch.equal(collected[key], collected[key].T)  # XᵀX / N is symmetric
            expected = gram(inputs[key])
            torch.testing.assert_close(collected[key].double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    tvs = [TaskVector.load(p) for p in paths]
    again = merge_task_vectors(tvs, "regmean", grams=grams, device="cpu")
    assert all(torch.equal(module.merged[k], again[k]) for k in again)  # the merge is the core's, given those grams
    assert module._merge_record["options"]["reduce_non_diagonal"] == 1.0


def _reference_fisher(
    state: dict[str, torch.Tensor], head: torch.Tensor, images: torch.Tensor, quick_base: Path
) -> dict:
    encoder = build_clip(MODEL, str(quick_base)).model.visual.double().eval()
    encoder.load_state_dict(state)
    params = dict(encoder.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for image in images.double():
        logits = F.normalize(encoder(image[None]), dim=-1) @ head.double().T
        log_probs = logits.log_softmax(dim=-1)[0]
        for label in range(len(log_probs)):
            grads = torch.autograd.grad(log_probs[label], list(params.values()), retain_graph=True)
            for key, grad in zip(params, grads, strict=True):
                total[key] += log_probs[label].exp().detach() * grad**2
    return {k: v / len(images) for k, v in total.items()}


def test_fisher_is_the_expected_squared_gradient_on_source_images(
    quick_base: Path, expert_task_vectors: dict, image_reads: list[str]
) -> None:
    paths = [str(expert_task_vectors[d]) for d in SOURCES]
    module, data = _merge("fisher", quick_base, paths, images=3)
    _assert_source_only(data, image_reads, 3)
    fishers = module.seen["fishers"]
    reference = [
        _reference_fisher(_expert_state(quick_base, p), module.head.weight, _proxy_images(d, 3), quick_base)
        for d, p in zip(SOURCES, paths, strict=True)
    ]
    for collected, expected in zip(fishers, reference, strict=True):
        assert set(collected) == set(TaskVector.load(paths[0])) == set(expected)
        for key, value in collected.items():
            assert value.shape == expected[key].shape and bool((value >= 0).all())
            scale = expected[key].abs().max()
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-3, atol=1e-5 * scale)
        assert any(bool(v.abs().sum() > 0) for v in collected.values())
    again = merge_task_vectors([TaskVector.load(p) for p in paths], "fisher", fishers=fishers, device="cpu")
    assert all(torch.equal(module.merged[k], again[k]) for k in again)


def test_esm_activations_are_the_target_layers_inputs(quick_base: Path, expert_task_vectors: dict) -> None:
    paths = [str(expert_task_vectors[d]) for d in SOURCES]
    module, _ = _merge("esm", quick_base, paths, images=8)
    activations = module.seen["activations"]
    targets = {f"transformer.resblocks.{b}.{n}" for b in range(2) for n in LINEAR if n != "attn.out_proj.weight"}
    for domain, path, collected in zip(SOURCES, paths, activations, strict=True):
        assert set(collected) == targets
        _, inputs = vit_forward(
            _expert_state(quick_base, path), _proxy_images(domain, 8), HEADS, _quick_gelu(quick_base)
        )
        for key in targets:
            torch.testing.assert_close(collected[key].double(), inputs[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_statistics_under_bf16_true_follow_the_float64_reference(
    method: str, quick_base: Path, expert_task_vectors: dict
) -> None:
    paths = [str(expert_task_vectors[d]) for d in SOURCES]
    module, _ = _merge(method, quick_base, paths, images=16 if method == "regmean" else 2, precision="bf16-true")
    state, images = _expert_state(quick_base, paths[0]), _proxy_images(SOURCES[0], 16 if method == "regmean" else 2)
    if method == "regmean":
        _, inputs = vit_forward(state, images, HEADS, _quick_gelu(quick_base))
        reference = {k: gram(inputs[k]) for k in module.seen["grams"][0]}
        collected = module.seen["grams"][0]
    else:
        reference = _reference_fisher(state, module.head.weight.float(), images, quick_base)
        collected = module.seen["fishers"][0]
    for key, value in collected.items():
        assert value.dtype == torch.float32  # summed in float32/float64 even when the model runs in bf16
        error = torch.linalg.norm(value.double() - reference[key]) / torch.linalg.norm(reference[key]).clamp_min(1e-30)
        assert error < (0.05 if method == "regmean" else 0.25), (key, float(error))


def test_statistics_given_as_options_are_refused(quick_base: Path, expert_task_vectors: dict) -> None:
    paths = [str(expert_task_vectors[d]) for d in SOURCES]
    with pytest.raises(ValueError, match=r"method_options\['grams'\]: MergeModule collects 'regmean's grams itself"):
        MergeModule(MODEL, str(quick_base), task_vectors=paths, method="regmean", method_options={"grams": []})
    with pytest.raises(ValueError, match="Unknown option"):
        MergeModule(MODEL, str(quick_base), task_vectors=paths, method="regmean", method_options={"fishers": []})
