"""A reduced study end to end: two seeds, both α modes, every section; what it reads; what it writes."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_score import MergeModule
from lightning_score.data import DomainDataModule
from lightning_score.models import build_clip
from lightning_score.study import evaluation
from tests.experts import QUICK_BASE
from tests.study.conftest import DOMAINS, ROWS, TEST_PER_CLASS, quick_study

SEEDS = [0, 1]
TARGETS = ["rot30", "rot60"]
ENTRIES = [row.name for row in ROWS] + ["SCORE (α tuned)", "TIES (α tuned)", "ESM (α tuned)"]


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


class Finished:
    """The finished reduced study, and what it was seen doing while it ran."""

    def __init__(self, folder: Path, records: list[dict]) -> None:
        self.folder = folder
        self.records = records
        self.searched: dict[str, list[torch.Tensor]] = {}  # target -> every image its α searches saw
        self.trained: list[tuple[list[str], list[Path]]] = []  # every fit: (train_domains, image files)
        self.merges = 0


@pytest.fixture(scope="module")
def finished(mini_digits: Path, quick_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    folder = tmp_path_factory.mktemp("study")
    seen = Finished(folder, [])
    choose_alpha, train_dataloader, merge = (
        MergeModule.choose_alpha,
        DomainDataModule.train_dataloader,
        MergeModule.merge,
    )

    def watched_search(module: MergeModule) -> float:
        images = seen.searched.setdefault(module.trainer.datamodule.target, [])
        hook = module.image_encoder.register_forward_pre_hook(lambda _, args: images.extend(args[0].detach().cpu()))
        try:
            return choose_alpha(module)
        finally:
            hook.remove()

    def watched_loader(self: DomainDataModule) -> object:
        loader = train_dataloader(self)
        seen.trained.append((self.train_domains, [p for part in loader.dataset.datasets for p, _ in part.samples]))
        return loader

    def counted_merge(self: MergeModule) -> object:
        seen.merges += 1
        return merge(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MergeModule, "choose_alpha", watched_search)
        patch.setattr(DomainDataModule, "train_dataloader", watched_loader)
        patch.setattr(MergeModule, "merge", counted_merge)
        seen.records = quick_study(folder, mini_digits, quick_base, seeds=SEEDS)
    yield seen


def _records(finished: Finished, method: str, target: str) -> list[dict]:
    return sorted(
        (r for r in finished.records if r["method"] == method and r["target"] == target), key=lambda r: r["seed"]
    )


def test_every_seed_target_and_line_is_evaluated_once_per_merge(finished: Finished) -> None:
    keys = sorted((r["seed"], r["target"], r["method"]) for r in finished.records)
    assert keys == sorted((s, t, m) for s in SEEDS for t in TARGETS for m in ENTRIES)
    expected = {
        "results.md",
        "results.csv",
        "results.json",
        "accuracy.png",
        "sar.png",
        "sar.json",
        "study.yaml",
        "study.log",
    }
    assert expected <= {p.name for p in finished.folder.iterdir()}
    for seed in SEEDS:
        folder = finished.folder / "task_vectors" / f"seed-{seed}"
        assert sorted(p.name for p in folder.glob("*.safetensors")) == [f"{d}.safetensors" for d in DOMAINS]
        assert sorted(p.name for p in (folder / "pooled").glob("*.safetensors")) == [
            f"{t}.safetensors" for t in TARGETS
        ]
    from lightning_score import TaskVector

    first, second = (TaskVector.load(finished.folder / f"task_vectors/seed-{s}/rot0.safetensors") for s in SEEDS)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # each seed fine-tunes its own experts
    assert finished.merges == len(SEEDS) * len(TARGETS) * 3  # one merge per row: α = 1 and tuned share it
    for record in finished.records:
        correct = evaluation.unpack_correct(record["correct"], record["num_images"])
        assert record["num_images"] == 10 * TEST_PER_CLASS and record["acc"] == pytest.approx(correct.mean())
        assert record["sources"] == {"expert": [record["target"]], "zeroshot": []}.get(
            record["mode"], [d for d in DOMAINS if d != record["target"]]
        )
        if record["tuned"]:
            assert record["section"] == "data" and record["alpha"] in [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
            assert record["alpha_search"]["selected"] == record["alpha"]
        elif record["mode"] == "merge":
            assert record["alpha"] == 1.0 and record["alpha_search"] is None
            assert record["section"] == ("data" if record["method"] == "ESM" else "data-free")
        else:
            assert record["section"] == "reference"


def test_results_json_and_csv_hold_every_number(finished: Finished) -> None:
    payload = json.loads((finished.folder / "results.json").read_text())
    assert payload["seeds"] == SEEDS and payload["targets"] == TARGETS and payload["reference"] == "SCORE"
    assert len(payload["records"]) == len(finished.records) and "correct" not in payload["records"][0]
    cells = {(a["method"], a["target"]): a for a in payload["aggregates"]}
    for method in ENTRIES:
        per_target = []
        for target in TARGETS:
            accs = [r["acc"] for r in _records(finished, method, target)]
            cell = cells[(method, target)]
            assert cell["acc"] == pytest.approx(np.mean(accs)) and cell["per_seed"] == pytest.approx(accs)
            assert cell["acc_std"] == pytest.approx(np.std(accs, ddof=1))
            assert cell["ci_low"] <= cell["acc"] <= cell["ci_high"]
            per_target.append(np.mean(accs))
        assert cells[(method, "Mean")]["acc"] == pytest.approx(np.mean(per_target))
        if method != "SCORE":
            score = cells[("SCORE", "Mean")]["acc"]
            assert cells[(method, "Mean")]["diff_vs_reference"] == pytest.approx(score - np.mean(per_target))
    zs, ex = cells[("Zero-shot", "rot30")]["acc"], cells[("Expert (target domain)", "rot30")]["acc"]
    tsv = cells[("TIES", "rot30")]
    assert tsv["normalized_acc"] == pytest.approx((tsv["acc"] - zs) / (ex - zs))
    lines = list(csv.DictReader((finished.folder / "results.csv").open()))
    assert len([x for x in lines if x["seed"] != "mean"]) == len(finished.records)
    assert len([x for x in lines if x["seed"] == "mean"]) == len(ENTRIES) * (len(TARGETS) + 1)


def test_results_md_ranks_within_sections(finished: Finished) -> None:
    text = (finished.folder / "results.md").read_text()
    main = text.split("## ")[0]
    lines = [line for line in main.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Method | rot30 | rot60 | Mean | Mean 95 % CI |"
    order = [line.split("|")[1].strip().strip("*") for line in lines[1:]]
    assert order == [
        "Data-free merges (α = 1)", "SCORE", "TIES",
        "Merges that use data (ESM; α chosen on the source domains' validation data)", "ESM", "SCORE (α tuned)",
        "TIES (α tuned)", "ESM (α tuned)",
        "References", "Zero-shot", "Logit ensemble", "Pooled fine-tune (ERM)", "Expert (target domain)",
    ]  # fmt: skip
    score = _records(finished, "SCORE", "rot30")
    accs = [r["acc"] for r in score]
    assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}" in lines[2]
    references = [line for line in lines if line.startswith("| *") and "**" not in line.split("|")[1]]
    assert len(references) == 4 and all("**" not in line for line in references)  # references are not ranked
    for section in (lines[2:4], lines[5:9]):  # each merge section has its own best per column
        assert any("**" in line.split("|")[2] for line in section)
    assert "## 95 % bootstrap intervals" in text and "## Paired differences: SCORE − method (points)" in text
    assert "## Normalized accuracy" in text and "## α chosen on the source domains' validation data" in text


def _image_digests(root: Path, domains: list[str]) -> set[str]:
    transform = build_clip(QUICK_BASE["model_name"], None).val_transform
    data = DomainDataModule(str(root), test_domains=domains, val_transform=transform, num_workers=0)
    data.setup("test")
    return {_digest(image) for loader in data.test_dataloader() for images, _ in loader for image in images}


def test_alpha_search_reads_only_the_sources_validation_images(finished: Finished, mini_digits: Path) -> None:
    """Every image any α search saw is a source domain's held-out image; none is the target's."""
    assert sorted(finished.searched) == TARGETS
    for target in TARGETS:
        seen = {_digest(image) for image in finished.searched[target]}
        sources = [d for d in DOMAINS if d != target]
        assert len(seen) == 10 * len(sources)  # alpha_images=10 per source, every one of them seen
        assert not seen & _image_digests(mini_digits, [target])
        assert seen <= _image_digests(mini_digits, sources)


def test_pooled_fine_tune_trains_on_the_union_of_the_sources_only(finished: Finished) -> None:
    pooled = [(domains, files) for domains, files in finished.trained if len(domains) > 1]
    assert len(pooled) == len(SEEDS) * len(TARGETS)
    for domains, files in pooled:
        target = next(d for d in DOMAINS if d not in domains)
        assert target in TARGETS and domains == [d for d in DOMAINS if d != target]
        assert {(f.parents[2].name, f.parents[1].name) for f in files} == {("train", d) for d in domains}
        assert len(files) == len(set(files)) == 10 * 6 * len(domains)  # every train image of every source, once
    from lightning_score import TaskVector

    tv = TaskVector.load(finished.folder / "task_vectors/seed-1/pooled/rot30.safetensors")
    assert tv.metadata["train_domains"] == ["rot0", "rot60"] and tv.metadata["name"] == "pooled-rot30"
    experts = [domains for domains, _ in finished.trained if len(domains) == 1]
    assert sorted(d for (d,) in experts) == sorted(DOMAINS * len(SEEDS))


def test_seeded_merge_methods_follow_the_study_seed(finished: Finished, quick_base: Path) -> None:
    from lightning_score.study import Row, StudyConfig
    from lightning_score.study.config import table_entries

    tvs = [str(finished.folder / f"task_vectors/seed-0/{d}.safetensors") for d in ("rot0", "rot60")]
    config = StudyConfig(model_name=QUICK_BASE["model_name"], pretrained=str(quick_base), templates="digits",
                         proxy_images=4, alpha_search="grid")  # fmt: skip

    def module(row: Row) -> MergeModule:
        (entry,) = table_entries([row], tune_alpha=False)
        return evaluation.merge_module(entry, tvs, config, seed=3)

    assert module(Row("DARE", method="dare_ties")).method_options["seed"] == 3
    assert module(Row("DARE", method="dare_ties", options={"seed": 7})).method_options["seed"] == 7  # the row's wins
    assert "seed" not in module(Row("TIES", method="ties")).method_options
    esm = module(Row("ESM", method="esm"))
    assert (esm.proxy_images, esm.alpha_search, esm.model_name) == (4, "grid", QUICK_BASE["model_name"])  # the study's


def test_results_json_and_study_log_record_the_machine_and_software(finished: Finished) -> None:
    """What reproducing the table bit for bit needs: the CPU, its threads, torch and its BLAS/LAPACK, Lightning."""
    import platform

    import lightning
    import torch

    environment = json.loads((finished.folder / "results.json").read_text())["environment"]
    assert environment["torch"] == torch.__version__ and environment["lightning"] == lightning.__version__
    assert environment["python"] == platform.python_version() and environment["cpu"]
    assert environment["torch_threads"] == torch.get_num_threads() and environment["cpu_count"] >= 1
    assert environment["blas"] and environment["lapack"]  # from torch.__config__.show()
    lines = [line for line in (finished.folder / "study.log").read_text().splitlines() if " environment: " in line]
    assert lines and json.loads(lines[-1].split(" environment: ", 1)[1])["torch"] == torch.__version__
