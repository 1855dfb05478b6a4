"""StudyConfig: every setting of ``lightning-score study`` as one frozen record, with run_study's defaults."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from lightning_score.study import ExpertSettings, Row, StudyConfig, run_study
from lightning_score.study.config import DEFAULT_ROWS, JOB_SETTINGS


def test_the_config_has_every_argument_of_run_study_with_its_default() -> None:
    parameters = inspect.signature(run_study).parameters
    fields = {field.name: field for field in dataclasses.fields(StudyConfig)}
    assert list(fields) == [name for name in parameters if name != "seed"]  # the deprecated seed becomes seeds
    for name, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        expected = parameters[name].default
        if name == "rows":
            assert default == DEFAULT_ROWS and expected is None  # run_study's None: the paper's table
        else:
            assert default == expected, name


def test_the_config_is_frozen_and_keeps_sequences_as_tuples() -> None:
    config = StudyConfig(output_dir=Path("/tmp/study"), domains=["a", "b"], rows=[Row("SCORE")], seeds=[0, 1])
    assert config.output_dir == "/tmp/study" and config.domains == ("a", "b") and config.seeds == (0, 1)
    assert config.rows == (Row("SCORE"),) and config.targets is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seeds = (3,)  # type: ignore[misc]
    assert StudyConfig(devices=2, num_nodes=3).world_size == 6


def test_the_record_is_what_the_study_is_in_plain_values() -> None:
    expert = ExpertSettings(max_steps=5)
    config = StudyConfig(domains=["a", "b"], targets=["b"], expert=expert, rows=[Row("S"), Row("Z", mode="zeroshot")],
                         seeds=[0], stage="experts", stage_domains=["a"], restart=True)  # fmt: skip
    record = config.record()
    assert JOB_SETTINGS == ("restart", "stage", "stage_domains") and not set(JOB_SETTINGS) & set(record)
    assert list(record) == [f.name for f in dataclasses.fields(StudyConfig) if f.name not in JOB_SETTINGS]
    assert record["domains"] == ["a", "b"] and record["targets"] == ["b"] and record["seeds"] == [0]
    assert record["expert"] == dataclasses.asdict(expert)
    assert record["rows"] == [dataclasses.asdict(Row("S")), dataclasses.asdict(Row("Z", mode="zeroshot"))]
    assert all(not isinstance(value, tuple) for value in record.values())  # yaml.safe_dump and json read it as is


def test_an_entry_records_the_options_its_merge_runs_with_so_new_defaults_are_not_reused() -> None:
    from lightning_score.study.config import table_entries

    rows = [Row("B", method="breadcrumbs", options={"keep": 0.3}), Row("D", method="dare_ta"),
            Row("D7", method="dare_ta", options={"seed": 7}), Row("F", method="fisher"), Row("Z", mode="zeroshot")]  # fmt: skip
    options = {entry.row.name: entry.method_options for entry in table_entries(rows, tune_alpha=False)}
    assert options["B"] == {"keep": 0.3, "drop_top": 0.006, "granularity": "row"}  # the default under the row's own
    assert options["D"] == {"drop_rate": 0.9}  # the seed is the study's, recorded beside it
    assert options["D7"] == {"drop_rate": 0.9, "seed": 7}
    assert options["F"] == {"fisher_floor": 1e-6, "normalize_fishers": True, "favor_first_model": True}  # no statistics
    assert options["Z"] == {}
