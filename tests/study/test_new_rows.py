"""Every added baseline runs as a study row (reduced: three digits domains, one target, a few steps).

DARE (TA and TIES), Model Breadcrumbs, RandMix, Model Stock, CART and WUDI are data-free; RegMean and
Fisher merging use statistics MergeModule collects from the sources' proxy images. The full table is
``recipes/digits/study_more_baselines.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_score.merging import get_method
from lightning_score.study import Row
from lightning_score.study.config import check_rows, slug
from tests.study.conftest import quick_study

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "digits" / "study_more_baselines.yaml"
NEW_ROWS = [
    Row("DARE (TA)", method="dare_ta"),
    Row("DARE (TIES)", method="dare_ties"),
    Row("Model Breadcrumbs", method="breadcrumbs"),
    Row("RandMix", method="randmix"),
    Row("Model Stock", method="model_stock"),
    Row("CART", method="cart"),
    Row("WUDI", method="wudi"),
    Row("RegMean", method="regmean"),
    Row("Fisher merging", method="fisher"),
]
SEEDED = [row.name for row in NEW_ROWS if "seed" in get_method(row.method).defaults]
# In the reduced study: WUDI with 30 of its 300 optimiser steps, and RegMean shrinking the Gram matrices'
# off-diagonal (its reduce_non_diagonal < 1, which keeps them invertible with 4 proxy images per source,
# where Fisher merging's one backward pass per class and image stays cheap). The recipe runs the defaults.
QUICK_OPTIONS = {"WUDI": {"iterations": 30}, "RegMean": {"reduce_non_diagonal": 0.9}}
TEST_ROWS = [Row(row.name, method=row.method, options=QUICK_OPTIONS.get(row.name, {})) for row in NEW_ROWS]


def test_the_recipe_has_the_paper_table_and_every_new_row() -> None:
    from lightning_score.study.config import DEFAULT_ROWS

    recipe = yaml.safe_load(RECIPE.read_text())
    rows = [Row(**row) for row in recipe["rows"]]
    check_rows(rows, tune_alpha=True)
    by_name = {row.name: row for row in rows}
    assert all(by_name[row.name] == row for row in DEFAULT_ROWS)  # the paper's table, unchanged
    assert all(by_name[row.name] == row for row in NEW_ROWS)
    assert len(rows) == len(DEFAULT_ROWS) + len(NEW_ROWS)
    assert SEEDED == ["DARE (TA)", "DARE (TIES)", "RandMix"]
    assert {r.method for r in rows if get_method(r.method).needs_data} == {"esm", "regmean", "fisher"}


def test_every_new_row_runs_and_the_seeded_ones_reproduce(mini_digits: Path, quick_base: Path, tmp_path: Path) -> None:
    settings = dict(targets=["rot30"], rows=TEST_ROWS, alpha_tuning=False, seeds=[0], bootstrap=50)
    records = {r["method"]: r for r in quick_study(tmp_path, mini_digits, quick_base, **settings)}
    assert sorted(records) == sorted(row.name for row in NEW_ROWS)
    for name, record in records.items():
        assert 0.0 <= record["acc"] <= 1.0 and 0.0 <= record["balanced_acc"] <= 1.0, name
        assert record["num_images"] == 50 and record["sources"] == ["rot0", "rot60"], name
    sections = {name: record["section"] for name, record in records.items()}
    assert sections["RegMean"] == sections["Fisher merging"] == "data"
    assert {sections[row.name] for row in TEST_ROWS[:7]} == {"data-free"}
    assert {r["options"].get("iterations") for n, r in records.items() if n == "WUDI"} == {30}
    # the seeded merges again from the same experts (their results removed, the fits kept): same bits
    folder = tmp_path / "results" / "seed-0" / "rot30"
    for name in SEEDED:
        (folder / f"{slug(name)}.json").unlink()
    again = {r["method"]: r for r in quick_study(tmp_path, mini_digits, quick_base, **settings)}
    for name in SEEDED:
        assert again[name]["correct"] == records[name]["correct"] and again[name]["acc"] == records[name]["acc"]
        assert json.loads((folder / f"{slug(name)}.json").read_text())["config"]["row"]["name"] == name


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_data_row_may_not_bring_its_own_statistics(method: str) -> None:
    option = {"regmean": "grams", "fisher": "fishers"}[method]
    with pytest.raises(ValueError, match=rf"\['{option}'\] are statistics the study collects"):
        check_rows([Row("Mine", method=method, options={option: {"x": 1}})])
    check_rows([Row("Mine", method=method, options={option: None})])  # unset: collected
