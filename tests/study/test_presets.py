"""A study on each dataset's layout picks the paper's protocol with no option given: templates, split, epochs, threshold.

Each dataset is a tiny generated folder in the layout that gives the paper's split (the generators of
``tests/data``); the study is only configured (resolution and checks, no fit), except one small study run
end to end on a RetinaDomains folder to see SCORE merged without the /T.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import yaml

from lightning_score.cli import main
from lightning_score.data.presets import PRESETS, get_preset
from lightning_score.study import ExpertSettings, Row, StudyConfig, run_study
from lightning_score.study import runner as study_runner
from lightning_score.study.config import Entry
from lightning_score.study.runner import Study
from tests.data.generate import image, png_bytes
from tests.data.test_presets import _paper_layout
from tests.data.test_split_files import _isic, _pacs, _terra
from tests.experts import QUICK_BASE

MODEL = "tiny-ViT-W64-L2"
ISIC_ROWS = [(f"ISIC_{i:07d}", i % 8, f"{'train' if (i // 6) % 4 else 'test'}_{i % 6}") for i in range(48)]


def _imagenet_r(root: Path) -> Path:
    """ImageNet-R as the authors' script writes it: ROOT/{train,test}/<class>/<domain>_<n>.jpg."""
    for split, count in (("train", 3), ("test", 1)):
        for c in ("goldfish", "tabby_cat"):
            for domain in ("cartoon", "origami", "toy"):
                for i in range(count):
                    image(root / split / c / f"{domain}_{split}{i}.jpg")
    return root


def _generated(tmp_path: Path, name: str) -> Path:
    """A tiny folder of dataset ``name`` in a layout that gives the paper's split."""
    root = tmp_path / name
    if name == "pacs":
        _pacs(root)
    elif name == "fed_isic2019":
        _isic(root, ISIC_ROWS)
    elif name == "terra_incognita":
        _terra(root)
    elif name == "imagenet_r":
        _imagenet_r(root)
    else:
        _paper_layout(root, name)
    return root


def _study(root: Path, output_dir: Path, **overrides: object) -> Study:
    """The study's configuration stage only: resolution and checks (Study's constructor), no base, fit or test."""
    settings = dict(
        output_dir=output_dir, model_name=MODEL, pretrained=None, templates="auto", root=str(root), domains=None,
        targets=None, expert=None, rows=None, accelerator="cpu", devices=1, eval_batch_size=8, num_workers=0,
        split_seed=17, val_fraction=0.0, proxy_images=2, seeds=[0], alpha_tuning=True, alpha_search="grid",
        alpha_images=None, bootstrap=10, restart=False,
    )  # fmt: skip
    settings.update(overrides)
    return Study(StudyConfig(**settings))


def _score_options(rows: list) -> list[dict]:
    return [dict(row.options) for row in rows if row.mode == "merge" and row.method == "score"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_study_picks_the_datasets_protocol_with_no_option_given(tmp_path: Path, name: str) -> None:
    preset = get_preset(name)
    root = _generated(tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a paper layout: no "this is not the paper's split" warning
        study = _study(root, tmp_path / "out")
    # the preset, detected from the domain folders, and the authors' prompt set
    assert study.config.dataset == name and study.preset is preset and study.config.templates == preset.templates
    # the paper's fine-tuning, with this dataset's epochs
    assert study.config.expert == ExpertSettings(max_epochs=preset.epochs) and study.config.expert.lr == 1e-5
    assert study.config.expert.max_epochs == {
        "terra_incognita": 15,
        "nico_pp": 15,
        "fed_isic2019": 20,
        "retina": 20,
    }.get(name, 10)
    # SCORE's threshold: without the /T on the medical datasets, in all four SCORE rows; other rows untouched
    medical = name in ("fed_isic2019", "retina")
    assert _score_options(study.config.rows) == [
        {**({"divide_by_tasks": False} if medical else {}), **extra}
        for extra in ({}, {"variant": "diagonal"}, {"variant": "off_diagonal"}, {"variant": "full"})
    ]
    assert all(not row.options for row in study.config.rows if row.method != "score" or row.mode != "merge")
    assert all(any(e.row is row for row in study.config.rows) for e in study.entries)  # the lines run the filled rows
    # the data: the paper's layout and split rule, experts on their whole train split, sources' test as validation
    domain = study.config.domains[0]
    data = study._data([domain], [study.config.domains[1]], batch_size=4)
    assert data.preset is preset and data.layout in preset.paper_layouts and study.layout == data.layout
    split = data.split(domain)
    assert len(split.fit) == len(data.samples(domain, "train")) and split.test and split.val
    if data.layout == "unsplit":  # random_split sizes [int(0.8 n), n - int(0.8 n)]
        n = len(split.fit) + len(split.test)
        assert len(split.fit) == int(0.8 * n)


def test_print_config_shows_the_resolved_protocol(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _generated(tmp_path, "retina")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", f"--root={root}", f"--model_name={MODEL}", "--pretrained=null", "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    printed = yaml.safe_load(captured.out)
    assert printed["dataset"] == "retina" and printed["templates"] == "retina"  # not "auto"
    assert printed["expert"]["max_epochs"] == 20 and printed["expert"]["lr"] == 1e-5 and printed["seeds"] == [0]
    scores = [row for row in printed["rows"] if row["method"] == "score" and row["mode"] == "merge"]
    assert len(scores) == 4 and all(row["options"]["divide_by_tasks"] is False for row in scores)
    # a row that sets the option itself keeps it; a preset name is accepted in any spelling
    with pytest.raises(SystemExit):
        main(["study", f"--root={root}", "--dataset=RetinaDomains", "--print_config",
              "--rows=[{name: S, method: score, options: {divide_by_tasks: true}}, {name: T, method: ties}]"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["dataset"] == "retina"
    assert [row["options"] for row in printed["rows"]] == [{"divide_by_tasks": True}, {}]
    assert (printed["model_name"], printed["pretrained"]) == ("ViT-B-32", "openai")  # no model given: the paper's


def test_real_data_with_no_model_given_fine_tunes_the_papers_backbone(tmp_path: Path) -> None:
    """``--root`` alone must not fine-tune the tiny digits model on real images: ViT-B/32 with openai's weights."""
    root = _generated(tmp_path, "pacs")
    study = _study(root, tmp_path / "out", model_name="auto", pretrained="auto")
    assert (study.config.model_name, study.config.pretrained) == ("ViT-B-32", "openai")
    # another architecture takes its openai weights; a value given wins, null (random weights) included
    assert _study(root, tmp_path / "out", model_name="ViT-L-14", pretrained="auto").config.pretrained == "openai"
    assert _study(root, tmp_path / "out", model_name="auto", pretrained=None).config.pretrained is None
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"")
    given = _study(root, tmp_path / "out", model_name="ViT-B-16", pretrained=str(weights))
    assert (given.config.model_name, given.config.pretrained) == ("ViT-B-16", str(weights))
    # the built-in benchmark keeps its tiny CPU model and offline base
    builtin = _study(
        "builtin:digits", tmp_path / "out", domains=["rot0", "rot15"], model_name="auto", pretrained="auto"
    )
    assert (builtin.config.model_name, builtin.config.pretrained) == ("tiny-ViT-W96-L3", "builtin:digits")
    assert _study("builtin:digits", tmp_path / "out", model_name="ViT-B-32", pretrained="auto").config.pretrained == (
        "builtin:digits"
    )
    # an architecture without openai weights: one error naming the model and the fix, before any work
    with pytest.raises(ValueError, match=rf"open_clip does not have for model_name '{MODEL}'.*local weights file"):
        _study(root, tmp_path / "out", model_name=MODEL, pretrained="auto")
    with pytest.raises(ValueError, match=r"'ViT-X-99' is not an open_clip architecture"):
        _study(root, tmp_path / "out", model_name="ViT-X-99", pretrained="auto")
    assert not (tmp_path / "out").exists()  # configuration only: nothing written


def test_given_settings_win_over_the_preset(tmp_path: Path) -> None:
    root = _generated(tmp_path, "fed_isic2019")
    expert = ExpertSettings(lr=3e-5, max_epochs=2, batch_size=32)
    rows = [Row("SCORE /T", options={"divide_by_tasks": True}), Row("SCORE"), Row("TIES", method="ties")]
    study = _study(root, tmp_path / "out", templates="medical_skin", expert=expert, rows=rows)
    assert study.config.templates == "medical_skin" and study.config.expert == expert
    assert _score_options(study.config.rows) == [{"divide_by_tasks": True}, {"divide_by_tasks": False}]
    steps = ExpertSettings(max_steps=7)  # epochs unset but unused: kept unset
    assert _study(root, tmp_path / "out", expert=steps).config.expert.max_epochs is None


def test_builtin_digits_keep_their_templates_and_schedule(tmp_path: Path) -> None:
    study = _study("builtin:digits", tmp_path / "out", domains=["rot0", "rot15"])
    assert (study.config.dataset, study.preset, study.config.templates) == ("none", None, "digits")
    expert = study.config.expert
    assert (expert.max_steps, expert.lr, expert.batch_size) == (150, 1e-3, 64)
    assert _score_options(study.config.rows)[0] == {}


def test_a_named_dataset_must_match_the_data(tmp_path: Path) -> None:
    office = _generated(tmp_path, "office_home")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused with one error, not a warning about PACS's split first
        with pytest.raises(ValueError, match=r"dataset='pacs' but the domains \['Art', 'Clipart'.*are not PACS's"):
            _study(office, tmp_path / "out", dataset="pacs")
    with pytest.raises(ValueError, match=r"dataset='retina' but root 'builtin:digits' is a built-in benchmark"):
        _study("builtin:digits", tmp_path / "out", dataset="retina")
    with pytest.raises(ValueError, match=r"Unknown dataset preset 'pcas'.*'pacs'"):
        _study(office, tmp_path / "out", dataset="pcas")
    # a forced preset that matches is used; "none" turns the preset off
    assert _study(office, tmp_path / "out", dataset="office_home").config.templates == "imagenet"
    off = _study(office, tmp_path / "out", dataset="none")
    assert (
        off.config.dataset == "none" and off.config.expert.max_epochs == 10 and _score_options(off.config.rows)[0] == {}
    )
    assert not (tmp_path / "out").exists()  # configuration only: nothing written


def test_an_end_to_end_study_merges_score_without_the_t_on_retina(
    tmp_path: Path, quick_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few steps on a generated RetinaDomains folder: SCORE's rows merge with the preset's divide_by_tasks."""
    root = tmp_path / "retina"
    rng = random.Random(0)
    for split, count in (("train", 4), ("test", 3)):
        for domain in ("aptos2019", "DDR", "messidor2"):
            for c in ("no_dr", "mild", "severe"):
                for i in range(count):
                    image(root / split / domain / c / f"{i}.png", png_bytes(rng.randrange(256), size=8))
    merged: list[dict] = []
    original = study_runner.merge_module

    def recorded(entry: Entry, *args: object, **kwargs: object) -> object:
        module = original(entry, *args, **kwargs)
        merged.append({"row": entry.row.name, "method": module.method, "options": dict(module.method_options)})
        return module

    monkeypatch.setattr(study_runner, "merge_module", recorded)
    rows = [Row("SCORE"), Row("SCORE (diagonal only)", options={"variant": "diagonal"}), Row("TIES", method="ties")]
    output = tmp_path / "study"
    records = run_study(
        output_dir=str(output), model_name=QUICK_BASE["model_name"], pretrained=str(quick_base), root=str(root),
        targets=["DDR"], expert=ExpertSettings(lr=1e-3, warmup_steps=1, max_steps=2, batch_size=8), rows=rows,
        accelerator="cpu", eval_batch_size=16, alpha_tuning=False, bootstrap=20,
    )  # fmt: skip
    assert {r["method"] for r in records} == {"SCORE", "SCORE (diagonal only)", "TIES"}
    assert all(0.0 <= r["acc"] <= 1.0 and r["num_images"] == 9 for r in records)
    assert merged == [
        {"row": "SCORE", "method": "score", "options": {"divide_by_tasks": False}},
        {
            "row": "SCORE (diagonal only)",
            "method": "score",
            "options": {"divide_by_tasks": False, "variant": "diagonal"},
        },
        {"row": "TIES", "method": "ties", "options": {}},
    ]
    recorded_config = yaml.safe_load((output / "study.yaml").read_text())
    assert (recorded_config["dataset"], recorded_config["templates"]) == ("retina", "retina")
    assert recorded_config["expert"]["max_steps"] == 2 and recorded_config["expert"]["max_epochs"] is None  # steps win
    assert recorded_config["rows"][0]["options"] == {"divide_by_tasks": False}
