"""From synthetic per-image results to the tables: sections, bold, paired marks, normalized accuracy, sentences."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_score.study.config import Row, table_entries
from lightning_score.study.evaluation import pack_correct
from lightning_score.study.summary import MEAN, summarize
from lightning_score.study.tables import markdown_report, significance

N = 400
ROWS = [
    Row("SCORE"),
    Row("Copy of SCORE", options={"z": 1.96}),
    Row("Worse", method="ties"),
    Row("ESM", method="esm"),
    Row("Zero-shot", mode="zeroshot"),
    Row("Expert (target domain)", mode="expert"),
]


def _correct(rate: float, seed: int) -> np.ndarray:
    out = np.zeros(N, dtype=bool)
    out[np.random.default_rng(seed).permutation(N)[: int(rate * N)]] = True
    return out


def _records() -> list[dict]:
    records = []
    entries = table_entries(ROWS, tune_alpha=True)
    for seed in (0, 1):
        for t, target in enumerate(("a", "b")):
            score = _correct(0.7, 10 * seed + t)
            worse = score.copy()
            worse[np.flatnonzero(score)[:60]] = False  # 15 points worse, on images SCORE gets right
            values = {"SCORE": score, "Copy of SCORE": score, "Worse": worse, "ESM": _correct(0.72, 100 + seed),
                      "Zero-shot": _correct(0.5, 7), "Expert (target domain)": _correct(0.9, 200 + seed)}  # fmt: skip
            for entry in entries:
                correct = values.get(entry.name, values[entry.row.name])
                if entry.name == "ESM (α tuned)" and target == "b" and seed == 1:
                    continue  # a missing evaluation leaves its cells empty, never a partial mean
                records.append({
                    "method": entry.name, "seed": seed, "target": target, "num_images": N,
                    "labels_digest": "same", "correct": pack_correct(correct), "alpha": 0.8 if entry.tuned else 1.0,
                })  # fmt: skip
    return records


def test_summary_numbers_and_report() -> None:
    entries = table_entries(ROWS, tune_alpha=True)
    summary = summarize(_records(), entries, ["a", "b"], [0, 1], resamples=300)
    assert summary.reference == "SCORE"
    assert summary.cells[("Worse", MEAN)].mean == pytest.approx(0.7 - 0.15)
    copy = summary.paired[("Copy of SCORE", MEAN)]
    assert (copy.mean, copy.low, copy.high) == (0.0, 0.0, 0.0) and not copy.significant
    worse = summary.paired[("Worse", MEAN)]
    assert worse.mean == pytest.approx(0.15) and worse.significant and worse.low > 0.1
    assert ("ESM (α tuned)", "b") not in summary.cells and ("ESM (α tuned)", MEAN) not in summary.cells
    assert ("ESM (α tuned)", "a") in summary.cells
    zs, ex = summary.cells[("Zero-shot", "a")].mean, summary.cells[("Expert (target domain)", "a")].mean
    assert summary.normalized[("SCORE", "a")] == pytest.approx((0.7 - zs) / (ex - zs))
    means = [summary.cells[(n, MEAN)].mean for n in ("SCORE", "Zero-shot", "Expert (target domain)")]
    assert summary.normalized[("SCORE", MEAN)] == pytest.approx((means[0] - means[1]) / (means[2] - means[1]))

    sentences = significance(summary)
    assert sentences[0].startswith("SCORE is significantly more accurate than: Worse (-15.00 points)")
    assert any(
        s.startswith("Not significantly different from SCORE:") and "Copy of SCORE (+0.00" in s for s in sentences
    )

    text = markdown_report(summary)
    lines = [line for line in text.split("## ")[0].splitlines() if line.startswith("| ")]
    worse_line = next(line for line in lines if line.startswith("| Worse "))
    assert "**" not in worse_line  # never the best of its section
    esm_line = next(line for line in lines if line.startswith("| ESM |"))
    assert esm_line.count("**") >= 2  # the best of "merges that use data" in some column, ranked apart from SCORE
    assert next(line for line in lines if line.startswith("| ESM (α tuned)")).split("|")[3].strip() == "–"
    paired = text.split("## Paired differences")[1].split("## ")[0]
    worse_paired = next(line for line in paired.splitlines() if line.startswith("| Worse "))
    assert "+15.00 †" in worse_paired and "[+" in worse_paired
    assert "| SCORE |  |  | (reference) |" in paired
    alphas = text.split("## α chosen")[1]
    assert "| SCORE (α tuned) | 0.8, 0.8 | 0.8, 0.8 |" in alphas


def test_rows_tested_on_different_images_are_refused() -> None:
    records = _records()
    records[3] = {**records[3], "labels_digest": "other"}
    with pytest.raises(ValueError, match="saw different test images"):
        summarize(records, table_entries(ROWS, tune_alpha=True), ["a", "b"], [0, 1], resamples=50)
