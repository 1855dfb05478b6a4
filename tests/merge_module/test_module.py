"""MergeModule: every mode through Trainer.test on the digits data, the merged weights, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_score import MergeModule, TaskVector
from lightning_score.classifier import CLIPClassifier
from lightning_score.merge_module.alpha import AlphaSearchResult
from lightning_score.merging import merge_task_vectors
from lightning_score.models import build_clip
from tests.experts import MODEL, QUIET, digits
from tests.unwritable import unwritable_folder


def _sources(paths: dict[str, Path], *domains: str) -> list[str]:
    return [str(paths[d]) for d in domains]


def _test(module: L.LightningModule, **data: object) -> dict[str, float]:
    return L.Trainer(**QUIET).test(module, datamodule=digits(**data), verbose=False)[0]


def test_task_vectors_name_their_domain(expert_task_vectors: dict[str, Path]) -> None:
    tv = TaskVector.load(expert_task_vectors["rot30"])
    assert tv.domain == "rot30" and tv.name == "rot30" and tv.base_model.startswith(MODEL)


def test_merge_mode_applies_the_engine_result_and_tests_the_target(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="score", templates="digits")
    results = _test(module, train_domains=["rot0", "rot60"], test_domains=["rot30"])
    assert {"test/rot30/acc", "test/rot30/balanced_acc"} <= set(results)
    expected = merge_task_vectors([TaskVector.load(p) for p in tvs], "score", device="cpu")
    base = build_clip(MODEL, str(quick_base)).model.visual.state_dict()
    for key, value in module.image_encoder.state_dict().items():
        torch.testing.assert_close(
            value, base[key] + expected[key] if key in expected else base[key], rtol=0, atol=1e-6
        )
    assert module.merge_seconds is not None and module.merge_seconds > 0


def test_merged_model_keeps_what_the_experts_learnt(quick_base: Path, expert_task_vectors: dict) -> None:
    """The merge of the rot0 and rot60 experts beats zero-shot on rot60's test split, which the upright-only base
    handles badly (the quick experts are too short-trained for held-out claims: rot60 is not held out, on purpose)."""
    data = {"train_domains": ["rot0", "rot60"], "test_domains": ["rot60"]}
    zeroshot = _test(MergeModule(MODEL, str(quick_base), mode="zeroshot", templates="digits"), **data)["test/rot60/acc"]
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    for method in ("score", "average"):
        module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method=method, templates="digits",
                             allow_target_experts=True)  # fmt: skip
        with pytest.warns(UserWarning, match="test domain 'rot60' is not held out"):
            merged = _test(module, **data)
        assert merged["test/rot60 (not held out)/acc"] > zeroshot + 0.05, method


def test_zeroshot_equals_the_plain_classifier(quick_base: Path) -> None:
    data = {"test_domains": ["rot15"]}
    a = _test(MergeModule(MODEL, str(quick_base), mode="zeroshot", templates="digits"), **data)
    b = _test(CLIPClassifier(MODEL, str(quick_base), templates="digits"), **data)
    assert a == b


def test_expert_mode_applies_one_task_vector(quick_base: Path, expert_task_vectors: dict) -> None:
    path = expert_task_vectors["rot30"]
    module = MergeModule(MODEL, str(quick_base), task_vectors=[str(path)], mode="expert", alpha=0.5, templates="digits")
    _test(module, test_domains=["rot30"])
    base = build_clip(MODEL, str(quick_base)).model.visual.state_dict()
    tv = TaskVector.load(path)
    for key in tv:
        torch.testing.assert_close(module.image_encoder.state_dict()[key], base[key] + 0.5 * tv[key], rtol=0, atol=1e-6)


def test_ensemble_averages_the_experts_logits(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, mode="ensemble", templates="digits")
    results = _test(module, test_domains=["rot30"])
    assert "test/rot30/acc" in results and len(module.experts) == 2
    images = torch.randn(4, 3, 32, 32)
    experts = [
        MergeModule(MODEL, str(quick_base), task_vectors=[p], mode="expert", classnames=module.head.classnames,
                    templates="digits")
        for p in tvs
    ]  # fmt: skip
    for expert in experts:
        expert.setup("test")
    with torch.no_grad():
        expected = torch.stack([expert(images) for expert in experts]).mean(0)
        torch.testing.assert_close(module(images), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to save"):
        module.save_merged("x.safetensors")


def test_alpha_auto_picks_from_the_grid_on_source_validation(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="tsv", alpha="auto", alpha_grid=[0.0, 0.5, 1.0],
                         templates="digits")  # fmt: skip
    assert module.alpha_search == module.hparams.alpha_search == "grid"  # the setting, one meaning
    assert module.alpha_search_result is None
    results = _test(module, train_domains=["rot0", "rot60"], test_domains=["rot30"])
    assert isinstance(module.alpha_search_result, AlphaSearchResult)  # the search, as the object
    assert module.alpha_search == module.hparams.alpha_search == "grid"
    search = module.alpha_search_result.to_dict()
    assert search["method"] == "grid" and search["alphas"] == [0.0, 0.5, 1.0] and len(search["val_acc"]) == 3
    assert search["selected"] == search["alphas"][max(range(3), key=lambda i: search["val_acc"][i])]
    assert results["alpha"] == search["selected"]
    assert search["val_acc"][search["alphas"].index(search["selected"])] > search["val_acc"][0]  # better than zero-shot


def test_esm_draws_proxy_images_from_the_sources_only(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="esm", templates="digits", proxy_images=8)
    results = _test(module, train_domains=["rot0", "rot60"], test_domains=["rot30"])
    assert "test/rot30/acc" in results
    assert module.merged.metadata["merge"]["alpha_exempt_keys"]  # ESM's α applies to its target layers only
    leaking = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="esm", templates="digits")
    with pytest.raises(ValueError, match="test domain 'rot60' is not held out"):
        _test(leaking, train_domains=["rot0"], test_domains=["rot60"])
    allowed = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="esm", templates="digits",
                          allow_target_experts=True)  # fmt: skip
    with pytest.warns(UserWarning, match="not held out"), pytest.raises(ValueError, match="expert of 'rot60', a test"):
        _test(allowed, train_domains=["rot0"], test_domains=["rot60"])  # allowed, but never its proxy images


def test_saved_merge_loads_through_the_model_factory(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path
) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="ties", templates="digits")
    _test(module, train_domains=["rot0", "rot60"], test_domains=["rot30"])
    path = module.save_merged(tmp_path / "merged.safetensors")
    loaded = build_clip(MODEL, str(path)).model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.visual(images), module.image_encoder.eval()(images), rtol=0, atol=0)
    again = MergeModule(MODEL, str(path), mode="zeroshot", templates="digits")
    assert again.pretrained_fingerprint != MergeModule(MODEL, str(quick_base), mode="zeroshot").pretrained_fingerprint


def test_bad_task_vectors_fail_when_the_trainer_sets_up_before_any_work(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path
) -> None:
    """The files are read first thing in setup: the errors come before the head is built or anything merged."""
    data = {"train_domains": ["rot0", "rot60"], "test_domains": ["rot30"]}
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    missing = MergeModule(MODEL, str(quick_base), task_vectors=[str(tmp_path / "missing.safetensors")])
    with pytest.raises(FileNotFoundError, match="missing.safetensors' does not exist"):
        _test(missing, **data)
    base = TaskVector.load(tvs[0]).base_model
    assert base.startswith(f"{MODEL}/")
    other_weights = MergeModule(MODEL, None, task_vectors=tvs)  # a randomly initialised model is not their base
    with pytest.raises(ValueError, match="was made from different pre-trained weights than") as error:
        _test(other_weights, **data)
    assert f"(fine-tuned from {base})" in str(error.value) and f"than {MODEL}/random, of the same architecture" in str(
        error.value
    )
    other_architecture = MergeModule("tiny-ViT-W96-L3", None, task_vectors=tvs)
    with pytest.raises(ValueError, match="different architecture") as error:
        _test(other_architecture, **data)
    message = str(error.value)
    assert f"(fine-tuned from {base}) is of a different architecture than tiny-ViT-W96-L3/random" in message
    assert "has shape [64] there and [96] here" in message and "set model_name and pretrained to theirs" in message
    for module in (missing, other_weights, other_architecture):
        assert module.head is None and module.merged is None


def test_bad_arguments_fail_when_the_module_is_made(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot60")
    with pytest.raises(ValueError, match="Unknown merge method 'scor'"):
        MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="scor")
    with pytest.raises(ValueError, match="Unknown option"):
        MergeModule(MODEL, str(quick_base), task_vectors=tvs, method_options={"zz": 1})
    with pytest.raises(ValueError, match="needs exactly one task vector"):
        MergeModule(MODEL, str(quick_base), task_vectors=tvs, mode="expert")
    with pytest.raises(ValueError, match="needs at least one task vector"):
        MergeModule(MODEL, str(quick_base), task_vectors=[])
    with pytest.raises(ValueError, match="mode='average' is not one of"):
        MergeModule(MODEL, str(quick_base), task_vectors=tvs, mode="average")
    with pytest.raises(ValueError, match="alpha must be a number or 'auto'"):
        MergeModule(MODEL, str(quick_base), task_vectors=tvs, alpha="best")


def test_a_shared_factor_cache_gives_the_same_merges_and_factorizes_each_expert_once(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path
) -> None:
    """Two targets x two SVD rows through MergeModule with one FactorCache: bit-identical to no cache, and each
    expert's SVDs are computed once (3 experts), not once per merge (2 targets x 2 rows x 2 experts)."""
    from lightning_score.merging import FactorCache

    cache = FactorCache(min_tasks=1)
    head = {"templates": "digits", "classnames": digits().classnames}
    domains = ("rot0", "rot30", "rot60")
    per_expert = None
    for target in ("rot30", "rot60"):
        tvs = _sources(expert_task_vectors, *[d for d in domains if d != target])
        for method, options in (("score", {}), ("tsv", {})):
            shared = MergeModule(
                MODEL, str(quick_base), task_vectors=tvs, method=method, method_options=options, factors=cache, **head
            )
            alone = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method=method, method_options=options, **head)
            shared.setup("test")
            alone.setup("test")
            assert shared.merged is not None and alone.merged is not None
            for key in alone.merged:
                assert torch.equal(shared.merged[key], alone.merged[key]), (target, method, key)
            assert "factors" not in shared.hparams
            if per_expert is None:  # after the first merge: its two experts' keys
                per_expert = cache.stats["svd_computed"] / 2
    assert per_expert is not None and per_expert >= 8  # every block's matrices at least
    assert cache.stats["svd_computed"] == len(domains) * per_expert


@pytest.mark.parametrize("precision", ["bf16-true", "16-mixed"])
def test_a_shared_factor_cache_under_the_trainers_precision_gives_the_same_model_and_accuracy(
    quick_base: Path, expert_task_vectors: dict, precision: str
) -> None:
    """Under a reduced precision (bf16-true converts the module, 16-mixed becomes bf16-mixed on CPU) the merges of
    two targets that share one FactorCache equal the merges without it, weights and test accuracy alike, and the
    second target reuses the expert they share."""
    from lightning_score.merging import FactorCache

    cache = FactorCache(min_tasks=1)
    head = {"templates": "digits", "classnames": digits().classnames}
    for sources, target in ((("rot0", "rot30"), "rot60"), (("rot0", "rot60"), "rot30")):
        outcomes = []
        for factors in (cache, None):
            module = MergeModule(
                MODEL, str(quick_base), task_vectors=_sources(expert_task_vectors, *sources), factors=factors, **head
            )
            trainer = L.Trainer(precision=precision, **QUIET)
            data = digits(train_domains=list(sources), test_domains=[target])
            results = trainer.test(module, datamodule=data, verbose=False)[0]
            outcomes.append((module.merged, results[f"test/{target}/acc"], module.image_encoder.state_dict()))
        (merged, acc, weights), (merged_alone, acc_alone, weights_alone) = outcomes
        assert merged is not None and merged_alone is not None
        assert all(torch.equal(merged[k], merged_alone[k]) for k in merged_alone)
        assert all(torch.equal(weights[k], weights_alone[k]) for k in weights_alone)
        assert acc == acc_alone
        expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {expected_dtype}
    assert cache.stats["svd_from_memory"] > 0  # rot0's factors, computed for the first target, reused


# --- checked before any merge work: held-out test domains, the merged output ---------------------------------


@pytest.mark.parametrize("mode", ["merge", "ensemble"])
def test_testing_on_a_merged_experts_own_domain_is_refused_before_any_work(
    mode: str, quick_base: Path, expert_task_vectors: dict
) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot30")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, mode=mode, templates="digits")
    with pytest.raises(ValueError) as raised:
        _test(module, train_domains=["rot0", "rot30"], test_domains=["rot30", "rot60"])
    assert str(raised.value).startswith(
        f"Target leakage: test domain 'rot30' is not held out: the task vector '{expert_task_vectors['rot30']}' "
        "was fine-tuned on it. Drop that task vector or that test domain, or set allow_target_experts=True"
    )
    assert module.head is None and module.merged is None and len(module.experts) == 0  # nothing built


def test_allowed_target_experts_are_tested_labelled_not_held_out(quick_base: Path, expert_task_vectors: dict) -> None:
    tvs = _sources(expert_task_vectors, "rot0", "rot30")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="average", templates="digits",
                         allow_target_experts=True)  # fmt: skip
    with pytest.warns(UserWarning, match=r"test domain 'rot30' is not held out: the task vector '.*rot30.safetensors'"):
        results = _test(module, train_domains=["rot0", "rot30"], test_domains=["rot30", "rot60"])
    assert {"test/rot30 (not held out)/acc", "test/rot60/acc"} <= set(results)  # rot60 stays held out
    assert not any(name.startswith("test/rot30/") for name in results)
    expert = MergeModule(MODEL, str(quick_base), task_vectors=tvs[1:], mode="expert", templates="digits")
    assert "test/rot30/acc" in _test(expert, test_domains=["rot30"])  # the own-expert reference row: as it is


def test_an_unwritable_merge_output_fails_at_setup_before_the_merge(
    quick_base: Path, expert_task_vectors: dict, tmp_path: Path
) -> None:
    """`lightning-score merge --output <read-only folder>/score.safetensors`: one error naming it, before merging."""
    from lightning_score.cli import ScoreTrainer
    from lightning_score.utilities.files import OutputNotWritableError

    tvs = _sources(expert_task_vectors, "rot0", "rot30")
    module = MergeModule(MODEL, str(quick_base), task_vectors=tvs, method="score", templates="digits")
    folder = tmp_path / "read-only"
    target = folder / "score.safetensors"
    trainer = ScoreTrainer(accelerator="cpu", devices=1, **QUIET)
    data = digits(train_domains=["rot0", "rot30"], test_domains=["rot60"])
    with unwritable_folder(folder) as reason, pytest.raises(OutputNotWritableError) as raised:
        trainer.merge(module, datamodule=data, output=str(target))
    assert str(raised.value) == (  # ScoreTrainer.merge checks it first, naming the command's flag
        f"--output {target} is not writable: cannot create a file in {folder} ({reason}); "
        "choose another location or fix its permissions"
    )
    assert module.merged is None and module.merge_seconds is None and module.head is None  # found before the work
    assert list(folder.iterdir()) == [] and trainer.merged_path is None
    # MergeModule's own check, for a merged output set without ScoreTrainer (its setup, before any merge work)
    module.merged_output = target
    with unwritable_folder(folder), pytest.raises(OutputNotWritableError, match=r"^The merged weights file .* is not"):
        ScoreTrainer(accelerator="cpu", devices=1, **QUIET).test(module, datamodule=data)
    assert module.merged is None and module.head is None
