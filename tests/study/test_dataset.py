"""What the study fills in when the recipe does not say: the model, the preset's protocol, SCORE's options, the seeds.

Configuration only: no data is read here except the built-in benchmark's name (``read_data=False`` stands for a
recipe printed away from its data); tests/study/test_presets.py reads a generated folder of every preset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_score.data.presets import get_preset
from lightning_score.study import ExpertSettings, Row
from lightning_score.study.config import DEFAULT_ROWS
from lightning_score.study.dataset import (
    BUILTIN_MODEL,
    DEFAULT_EPOCHS,
    DIGITS_EXPERT,
    PAPER_MODEL,
    preset_rows,
    resolve_dataset,
    resolve_model,
    resolved_arguments,
)


def test_the_model_defaults_to_the_papers_on_real_data_and_the_tiny_one_on_the_builtin_benchmark() -> None:
    assert resolve_model("auto", "auto", builtin=False) == PAPER_MODEL == ("ViT-B-32", "openai")
    assert resolve_model("auto", "auto", builtin=True) == BUILTIN_MODEL == ("tiny-ViT-W96-L3", "builtin:digits")
    assert resolve_model("ViT-L-14", "auto", builtin=False) == ("ViT-L-14", "openai")  # its openai weights
    assert resolve_model("ViT-B-32", "auto", builtin=True) == ("ViT-B-32", "builtin:digits")
    assert resolve_model("auto", None, builtin=False) == ("ViT-B-32", None)  # null: random weights, kept
    assert resolve_model("ViT-B-16", "/w/mine.safetensors", builtin=False) == ("ViT-B-16", "/w/mine.safetensors")
    assert resolve_model("ViT-X-99", "auto", builtin=False) == ("ViT-X-99", "auto")  # the checks name it later


@pytest.mark.parametrize(
    ("model", "tags"),
    [
        ("coca_ViT-B-32", "['laion2b_s13b_b90k', 'mscoco_finetuned_laion2b_s13b_b90k']"),
        ("tiny-ViT-W64-L2", "(it has none)"),
    ],
)
def test_pretrained_auto_is_refused_with_the_tags_for_an_architecture_without_openai_weights(
    model: str, tags: str
) -> None:
    with pytest.raises(ValueError, match="pretrained: auto takes the 'openai' weights") as error:
        resolve_model(model, "auto", builtin=False)
    assert f"for model_name '{model}'. Set pretrained to one of its tags {tags}, a local weights file" in str(
        error.value
    )
    assert resolve_model(model, "auto", builtin=True) == (model, "builtin:digits")  # the built-in base: no tag needed


def test_a_presets_score_options_go_to_score_rows_only_where_unset() -> None:
    retina = get_preset("retina")
    rows = [
        Row("SCORE"),
        Row("SCORE /T", options={"divide_by_tasks": True}),
        Row("SCORE (diagonal only)", options={"variant": "diagonal"}),
        Row("TIES", method="ties"),
        Row("Zero-shot", mode="zeroshot"),  # its method field is score's default, but it merges nothing
    ]
    filled = preset_rows(rows, retina)
    assert [row.options for row in filled] == [
        {"divide_by_tasks": False},
        {"divide_by_tasks": True},  # the row's own value wins
        {"divide_by_tasks": False, "variant": "diagonal"},
        {},
        {},
    ]
    assert filled[3] is rows[3] and filled[4] is rows[4] and rows[0].options == {}  # the given rows are not changed
    assert preset_rows(rows, get_preset("pacs")) == rows  # no SCORE options: the rows as they are
    assert preset_rows(rows, None) == rows
    assert preset_rows(None, None) == list(DEFAULT_ROWS)


def test_the_builtin_benchmark_takes_its_own_templates_schedule_and_model() -> None:
    choice = resolve_dataset("builtin:digits")
    assert (choice.dataset, choice.preset, choice.templates, choice.layout) == ("none", None, "digits", None)
    assert choice.expert == DIGITS_EXPERT and (choice.model_name, choice.pretrained) == BUILTIN_MODEL
    assert choice.rows == list(DEFAULT_ROWS)
    given = ExpertSettings(max_steps=-1, max_epochs=None)
    assert resolve_dataset("builtin:digits", expert=given).expert.max_epochs == DEFAULT_EPOCHS  # no preset: 10
    with pytest.raises(ValueError, match="is a built-in benchmark"):
        resolve_dataset("builtin:digits", dataset="pacs")


def test_a_named_preset_fills_real_data_defaults_without_reading_the_data() -> None:
    choice = resolve_dataset("/no/such/RetinaDomains", dataset="retina", read_data=False)
    retina = get_preset("retina")
    assert (choice.dataset, choice.preset, choice.templates) == ("retina", retina, "retina")
    assert choice.expert == ExpertSettings(max_epochs=retina.epochs) and choice.expert.lr == 1e-5  # the paper's
    assert (choice.model_name, choice.pretrained) == PAPER_MODEL
    scores = [row for row in choice.rows if row.mode == "merge" and row.method == "score"]
    assert len(scores) == 4 and all(row.options["divide_by_tasks"] is False for row in scores)
    # the table's lines carry the filled rows (the same objects) and each row's method, looked up once
    assert [e.row for e in choice.entries if not e.tuned] == [r for r in choice.rows if r.mode == "merge"] + [
        r for r in choice.rows if r.mode != "merge"
    ]
    assert all(any(e.row is row for row in choice.rows) for e in choice.entries)
    assert {e.row.name: e.needs_data for e in choice.entries}["ESM"]
    tuned = resolve_dataset("/no/such/RetinaDomains", dataset="retina", read_data=False, tune_alpha=True)
    assert len(tuned.entries) == len(choice.entries) + sum(row.is_weight_merge for row in choice.rows)
    # auto, unread: nothing is decided from data that is not there
    unread = resolve_dataset("/no/such/data", read_data=False)
    assert (unread.dataset, unread.templates, unread.expert) == ("auto", "auto", ExpertSettings())


def test_a_bad_row_fails_before_the_data_is_read(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rows\[0\] \('Mine'\): Unknown merge method 'scroe'"):
        resolve_dataset(str(tmp_path / "missing"), rows=[Row("Mine", method="scroe")])  # not FileNotFoundError
    with pytest.raises(ValueError, match="Row names must be distinct"):
        resolve_dataset("builtin:digits", rows=[Row("TIES", method="ties"), Row("TIES (alpha tuned)")], tune_alpha=True)


def _arguments(**overrides: object) -> SimpleNamespace:
    values = dict(root="builtin:digits", model_name="auto", pretrained="auto", dataset="auto", templates="auto",
                  expert=None, rows=None, seeds=None, seed=None)  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def test_resolved_arguments_are_plain_values_of_the_resolved_choice(caplog: pytest.LogCaptureFixture) -> None:
    resolved = resolved_arguments(_arguments())
    assert (resolved["model_name"], resolved["pretrained"]) == BUILTIN_MODEL
    assert (resolved["dataset"], resolved["templates"], resolved["seeds"], resolved["seed"]) == (
        "none", "digits", [0, 1, 2], None
    )  # fmt: skip
    assert resolved["expert"] == vars(DIGITS_EXPERT) and resolved["rows"][1] == {
        "name": "SCORE (diagonal only)", "mode": "merge", "method": "score", "options": {"variant": "diagonal"},
        "alpha": 1.0,
    }  # fmt: skip
    assert resolved_arguments(_arguments(seed=5))["seeds"] == [5]  # the deprecated single seed
    with caplog.at_level(logging.WARNING, logger="lightning_score.study.dataset"):
        away = resolved_arguments(_arguments(root="/no/such/PACS"))
    assert "does not exist here" in caplog.text
    assert (away["dataset"], away["templates"], away["seeds"]) == ("auto", "auto", [0])  # real data: one seed
    assert (away["model_name"], away["pretrained"]) == PAPER_MODEL
    named = resolved_arguments(_arguments(root="/no/such/PACS", dataset="pacs"))
    assert (named["dataset"], named["templates"], named["expert"]["max_epochs"]) == ("pacs", "pacs", 10)
