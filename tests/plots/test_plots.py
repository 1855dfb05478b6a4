"""Plots: the figures hold what a reader needs (names, values, colour bar), nothing is clipped, PNGs are written atomically."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import lightning_score.plots as plots_module
from lightning_score.analysis import SingularSpectra, SubspaceAlignment, singular_spectra, subspace_alignment
from lightning_score.plots import (
    method_accuracy_figure,
    plot_method_accuracy,
    plot_singular_spectra,
    plot_subspace_alignment,
    save_png,
    short_key,
    singular_spectra_figure,
    subspace_alignment_figure,
)

NAMES = ["art_painting", "cartoon", "photo", "sketch", "clipart", "infograph"]


def vit_b32_keys() -> dict[str, tuple[int, int]]:
    """The matrix keys of an open_clip ViT-B/32 image tower: 12 blocks × 4 matrices + 2."""
    d = 768
    shapes = {"positional_embedding": (50, d)}
    for b in range(12):
        shapes[f"transformer.resblocks.{b}.attn.in_proj_weight"] = (3 * d, d)
        shapes[f"transformer.resblocks.{b}.attn.out_proj.weight"] = (d, d)
        shapes[f"transformer.resblocks.{b}.mlp.c_fc.weight"] = (4 * d, d)
        shapes[f"transformer.resblocks.{b}.mlp.c_proj.weight"] = (d, 4 * d)
    shapes["proj"] = (d, 512)
    return shapes


def synthetic_alignment(names: list[str]) -> SubspaceAlignment:
    T = len(names)
    g = torch.Generator().manual_seed(0)
    matrix = 0.2 + 0.6 * torch.rand(T, T, generator=g, dtype=torch.float64)
    matrix.fill_diagonal_(0.99)
    keys = list(vit_b32_keys())
    return SubspaceAlignment(matrix=matrix, per_key={k: matrix for k in keys}, names=names, energy=0.97)


def synthetic_spectra(names: list[str]) -> SingularSpectra:
    """ViT-B/32-shaped spectra without any SVD: geometric decays with task-dependent rates."""
    shapes = vit_b32_keys()
    values, ranks, norms = {}, {}, {}
    for index, (key, (m, n)) in enumerate(shapes.items()):
        r = min(m, n)
        rates = torch.tensor([0.990 - 0.002 * t - 0.0001 * index for t in range(len(names))], dtype=torch.float64)
        s = rates[:, None] ** torch.arange(r, dtype=torch.float64)[None, :]
        values[key] = s
        norms[key] = s.norm(dim=1)
        cumulative = (s**2).cumsum(1) / (s**2).sum(1, keepdim=True)
        ranks[key] = (cumulative < 0.97).sum(1) + 1
    return SingularSpectra(
        names=names,
        energy=0.97,
        top=None,
        shapes=shapes,
        effective_rank=ranks,
        singular_values=values,
        frobenius_norm=norms,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_nothing_clipped(figure) -> None:
    """Everything drawn (texts, legends, colour bar) lies inside the figure, to 1 px."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    drawn = figure.get_tightbbox(renderer)  # inches, over the artists actually drawn
    page = figure.bbox_inches
    slack = 1.0 / figure.dpi
    assert drawn.x0 >= page.x0 - slack and drawn.y0 >= page.y0 - slack, (drawn, page)
    assert drawn.x1 <= page.x1 + slack and drawn.y1 <= page.y1 + slack, (drawn, page)


# --- SAR heat-map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [NAMES, ["a", "b"], [f"domain number {i}" for i in range(10)]])
def test_heat_map_has_names_values_orientation_and_a_colour_bar(names: list[str]) -> None:
    sar = synthetic_alignment(names)
    figure = subspace_alignment_figure(sar)
    heat, colour_bar = figure.axes  # the heat-map and its colour bar
    assert [t.get_text() for t in heat.get_xticklabels()] == names
    assert [t.get_text() for t in heat.get_yticklabels()] == names
    cells = [t.get_text() for t in heat.texts]
    assert len(cells) == len(names) ** 2
    assert cells[1] == f"{sar.matrix[0, 1].item():.2f}"  # row-major: row i = basis task, column j = projected task
    assert "basis task" in heat.get_ylabel() and "projected task" in heat.get_xlabel()
    assert "row $i$ = basis task" in heat.get_title() and "energy 0.97" in heat.get_title()
    assert "SAR" in colour_bar.get_ylabel()
    image = heat.images[0]
    assert image.get_clim() == (0.0, 1.0)
    assert_nothing_clipped(figure)


def test_heat_map_png_from_a_real_analysis_and_from_its_json(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(12, 8, generator=g), "v": torch.randn(8, 8, generator=g)} for _ in range(3)]
    sar = subspace_alignment(tvs)
    path = plot_subspace_alignment(sar, tmp_path / "out" / "sar.png")
    assert path == tmp_path / "out" / "sar.png" and path.stat().st_size > 20_000
    width, height = png_size(path)
    assert 600 <= width <= 3000 and 600 <= height <= 3000
    again = plot_subspace_alignment(sar.to_dict(), tmp_path / "sar-from-json.png", title="PACS, ViT-B/32", dpi=80)
    assert png_size(again)[0] < width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sar-from-json.png"]  # no temporary files left
    with pytest.raises(TypeError, match="SubspaceAlignment"):
        subspace_alignment_figure([[1.0]])  # type: ignore[arg-type]


# --- spectra --------------------------------------------------------------------------------------


def test_spectrum_plot_is_readable_for_vit_b32(tmp_path: Path) -> None:
    spectra = synthetic_spectra(NAMES)
    figure = singular_spectra_figure(spectra)
    top, *curves = figure.axes
    labels = [t.get_text() for t in top.get_xticklabels()]
    assert len(labels) == 50 and labels[0] == "positional_embedding" and labels[1] == "b0.attn.in_proj"
    assert labels[-1] == "proj" and labels[-2] == "b11.mlp.c_proj"
    assert [t.get_text() for t in top.get_legend().get_texts()] == NAMES
    assert len(top.get_lines()) >= len(NAMES)
    # by default the decay panels are spread over the transformer blocks, first to last
    assert [ax.get_title().split()[0] for ax in curves] == [
        "b0.attn.in_proj",
        "b4.attn.in_proj",
        "b7.mlp.c_proj",
        "b11.mlp.c_proj",
    ]
    assert all(ax.get_yscale() == "log" for ax in curves)
    assert_nothing_clipped(figure)
    path = save_png(figure, tmp_path / "spectra.png", dpi=100)
    width, height = png_size(path)
    assert width >= 1200 and 600 <= height <= 1500 and path.stat().st_size > 50_000


def test_spectrum_plot_options_and_a_tiny_real_model(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tvs = [{"a": torch.randn(6, 4, generator=g), "b.0.w": torch.zeros(5, 5)} for _ in range(2)]
    spectra = singular_spectra(tvs)  # `b.0.w` is zero in every task: no curve, rank 0
    figure = singular_spectra_figure(spectra, layers=["a", "b.0.w"])
    assert len(figure.axes) == 3 and figure.axes[1].get_title().startswith("a  (6×4)")
    assert [t.get_text() for t in figure.axes[2].texts] == ["zero in every task"]
    assert_nothing_clipped(figure)
    only_ranks = singular_spectra_figure(spectra.to_dict(), max_layers=0)
    assert len(only_ranks.axes) == 1
    truncated = singular_spectra_figure(singular_spectra(tvs, top=2), layers=["a"])
    assert "leading 2" in truncated.axes[1].get_title()
    with pytest.raises(ValueError, match="Layer 'nope' is not among the spectra's keys"):
        singular_spectra_figure(spectra, layers=["nope"])
    assert png_size(plot_singular_spectra(spectra, tmp_path / "tiny.png"))[0] > 500


# --- merge-method accuracy ------------------------------------------------------------------------


def test_method_accuracy_bars_highlight_the_best_and_show_domains(tmp_path: Path) -> None:
    table = {
        "zero-shot": {"art": 0.61, "cartoon": 0.55, "photo": 0.90, "sketch": 0.40},
        "tsv": {"art": 0.68, "cartoon": 0.63, "photo": 0.93, "sketch": 0.53},
        "score": {"art": 0.69, "cartoon": 0.65, "photo": 0.94, "sketch": 0.55},
        "per-domain expert": {"art": 0.80, "cartoon": 0.80, "photo": 0.97, "sketch": 0.70},
    }
    figure = method_accuracy_figure(table, exclude_from_best=["per-domain expert"])
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table)
    bars = ax.patches
    assert [round(b.get_width(), 6) for b in bars] == [61.5, 69.25, 70.75, 81.75]  # fractions drawn as %
    colours = [b.get_facecolor() for b in bars]
    assert colours[2] != colours[0] and colours[0] == colours[1] == colours[3]  # score, not the upper bound
    assert ax.get_yticklabels()[2].get_fontweight() == "bold"
    assert "70.75  (best)" in [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["art", "cartoon", "photo", "sketch"]
    assert ax.get_xlabel() == "accuracy (%)"
    assert_nothing_clipped(figure)
    path = plot_method_accuracy(table, tmp_path / "methods.png")
    assert png_size(path)[0] > 800 and path.stat().st_size > 20_000


def test_method_accuracy_error_bars_span_each_interval(tmp_path: Path) -> None:
    table = {"score": {"a": 0.60, "b": 0.70}, "tsv": {"a": 0.50, "b": 0.62}, "expert": 0.9}
    intervals = {"score": (0.62, 0.68), "expert": (0.88, 0.93)}  # tsv has none
    ax = method_accuracy_figure(table, intervals=intervals, exclude_from_best=["expert"]).axes[0]
    (bars,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    segments = bars.lines[2][0].get_segments()
    spans = sorted((round(float(s[0][0]), 6), round(float(s[1][0]), 6), round(float(s[0][1]), 6)) for s in segments)
    assert spans == [(62.0, 68.0, 0.0), (88.0, 93.0, 2.0)]  # in percent, on the rows of score and expert
    label = next(t for t in ax.texts if t.get_text().startswith("65.00"))
    assert label.get_position()[0] > 68.0  # the value is written right of the error bar, not under it
    assert png_size(plot_method_accuracy(table, tmp_path / "bars.png", intervals=intervals))[0] > 800
    with pytest.raises(ValueError, match="does not contain its mean"):
        method_accuracy_figure(table, intervals={"score": (0.70, 0.80)})
    with pytest.raises(ValueError, match="not in the table"):
        method_accuracy_figure(table, intervals={"ties": (0.1, 0.2)})


def _error_bars(ax: object) -> list[tuple[float, float, float]]:
    """Every error bar of the axes as (low, high, row position), in drawn units, sorted."""
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    segments = [s for c in bars for s in c.lines[2][0].get_segments()]
    assert all(float(s[0][1]) == float(s[1][1]) for s in segments)  # horizontal bars
    return sorted((round(float(s[0][0]), 6), round(float(s[1][0]), 6), round(float(s[0][1]), 6)) for s in segments)


def test_method_accuracy_error_bars_on_every_cell_with_their_meaning_in_the_legend() -> None:
    table = {"score": {"a": 0.60, "b": 0.70}, "tsv": {"a": 0.50, "b": 0.62}}
    intervals = {"score": (0.62, 0.68), "tsv": (0.50, 0.62)}
    cells = {"score": {"a": (0.55, 0.64), "b": (0.66, 0.75)}, "tsv": {"b": (0.60, 0.63)}}  # tsv on a: none
    figure = method_accuracy_figure(table, intervals=intervals, domain_intervals=cells, interval_label="± std")
    ax = figure.axes[0]
    spans = [(low, high) for low, high, _ in _error_bars(ax)]
    assert sorted(spans) == [(50.0, 62.0), (55.0, 64.0), (60.0, 63.0), (62.0, 68.0), (66.0, 75.0)]
    rows = {(low, high): row for low, high, row in _error_bars(ax)}
    assert rows[(62.0, 68.0)] == 0.0 and rows[(50.0, 62.0)] == 1.0  # the means' bars on their rows
    # each cell's bar passes through its dot (same row offset as the domain's marker)
    dots = {(round(float(x), 6), round(float(y), 6)) for c in ax.collections for x, y in c.get_offsets()}
    assert (
        (60.0, rows[(55.0, 64.0)]) in dots and (70.0, rows[(66.0, 75.0)]) in dots and (62.0, rows[(60.0, 63.0)]) in dots
    )
    assert rows[(55.0, 64.0)] < 0.0 < rows[(66.0, 75.0)] < 0.5  # domain a above, b below the bar's centre
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "± std"]
    assert_nothing_clipped(figure)
    with pytest.raises(ValueError, match="interval of 'score' on 'a' .* does not contain its value 60"):
        method_accuracy_figure(table, domain_intervals={"score": {"a": (0.61, 0.7)}})
    with pytest.raises(ValueError, match=r"domain_intervals name domains that are not in the table: \['c'\]"):
        method_accuracy_figure(table, domain_intervals={"score": {"c": (0.1, 0.2)}})
    plain = method_accuracy_figure({"score": 0.6}, intervals={"score": (0.5, 0.7)}).axes[0]
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["interval"]


def _study_records(seeds: list[int], rates: dict[str, float], n: int = 200) -> list[dict]:
    from lightning_score.study.evaluation import pack_correct

    records = []
    for seed in seeds:
        for t, target in enumerate(("a", "b")):
            for k, (name, rate) in enumerate(rates.items()):
                correct = np.zeros(n, dtype=bool)
                hits = int((rate + 0.05 * seed + 0.1 * t) * n)
                correct[np.random.default_rng(100 * seed + 10 * t + k).permutation(n)[:hits]] = True
                records.append({"method": name, "seed": seed, "target": target, "num_images": n,
                                "labels_digest": "same", "correct": pack_correct(correct)})  # fmt: skip
    return records


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_study_accuracy_png_error_bars_are_the_summarys_intervals(
    seeds: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One seed: each cell's and mean's 95 % bootstrap interval; several: mean ± std over seeds (said in the legend)."""
    from lightning_score.study.config import Row, table_entries
    from lightning_score.study.report import write_report
    from lightning_score.study.summary import MEAN

    entries = table_entries([Row("SCORE"), Row("TIES", method="ties"), Row("Zero-shot", mode="zeroshot")], False)
    records = _study_records(seeds, {"SCORE": 0.6, "TIES": 0.5, "Zero-shot": 0.3})
    drawn = {}

    def keep(table: object, path: Path, **kwargs: object) -> Path:
        drawn["figure"] = method_accuracy_figure(table, **{k: v for k, v in kwargs.items() if k != "dpi"})
        return plots_module.save_png(drawn["figure"], path)

    monkeypatch.setattr(plots_module, "plot_method_accuracy", keep)
    written, summary = write_report(records, entries, ["a", "b"], seeds, tmp_path, resamples=200)
    assert written["accuracy.png"].is_file()
    expected = []
    for entry in entries:
        for column in ("a", "b", MEAN):
            cell = summary.cells[(entry.name, column)]
            low, high = (cell.mean - cell.std, cell.mean + cell.std) if len(seeds) > 1 else (cell.low, cell.high)
            assert low < cell.mean < high  # a real interval, not a point
            expected.append((round(100 * low, 6), round(100 * high, 6)))
    ax = drawn["figure"].axes[0]
    assert sorted((low, high) for low, high, _ in _error_bars(ax)) == sorted(expected)
    label = "± std over 3 seeds" if len(seeds) > 1 else "95 % bootstrap interval over test images"
    assert (
        ax.get_legend().get_texts()[-1].get_text() == label and ax.get_title() == "Mean accuracy over held-out domains"
    )
    assert_nothing_clipped(drawn["figure"])


def test_method_accuracy_plain_means_missing_values_and_units() -> None:
    table = {"score": 65.69, "tsv": 64.95, "ties": 64.84, "iso_cts": float("nan"), "zero-shot": 55.63}
    ax = method_accuracy_figure(table).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "65.69  (best)" in texts and "n/a" in texts
    assert ax.patches[0].get_width() == pytest.approx(65.69)  # already percentages: drawn as given
    ax = method_accuracy_figure({"a": 0.5, "b": 0.7}, unit="percent", highlight_best=False).axes[0]
    assert [b.get_width() for b in ax.patches] == [0.5, 0.7]
    assert len({b.get_facecolor() for b in ax.patches}) == 1
    ax = method_accuracy_figure({"a": {"mean": 0.6, "x": 0.2, "y": 0.4}}).axes[0]
    assert ax.patches[0].get_width() == pytest.approx(60.0)  # an explicit "mean" wins over the domains' mean


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "non-empty mapping"),
        ([("score", 0.6)], "non-empty mapping"),
        ({"score": "high"}, "expected a number or a mapping"),
        ({"score": {}}, "empty mapping of per-domain accuracies"),
    ],
)
def test_method_accuracy_bad_tables(table: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method_accuracy_figure(table)  # type: ignore[arg-type]


def test_method_accuracy_bad_unit() -> None:
    with pytest.raises(ValueError, match="unit must be"):
        method_accuracy_figure({"a": 0.5}, unit="ratio")


# --- writing, imports -----------------------------------------------------------------------------


def test_save_png_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figure = method_accuracy_figure({"a": 0.5})
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    assert save_png(figure, target) == target and png_size(target)[0] > 100

    def broken(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"partial")  # type: ignore[arg-type]
        raise RuntimeError("disk full")

    before = target.read_bytes()
    monkeypatch.setattr(figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_png(figure, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # and no temporary file is left


def test_missing_matplotlib_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-score\[plot\]'"):
        subspace_alignment_figure(synthetic_alignment(["a", "b"]))


def test_short_key() -> None:
    assert short_key("transformer.resblocks.3.mlp.c_fc.weight") == "b3.mlp.c_fc"
    assert short_key("transformer.resblocks.10.attn.out_proj.weight") == "b10.attn.out_proj"


def test_plots_never_touch_pyplot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` now fails
    save_png(subspace_alignment_figure(synthetic_alignment(["a", "b"])), tmp_path / "a.png", dpi=40)
    save_png(method_accuracy_figure({"a": 0.5}), tmp_path / "b.png", dpi=40)
    tiny = singular_spectra([{"w": torch.randn(4, 3)}])
    save_png(singular_spectra_figure(tiny), tmp_path / "c.png", dpi=40)
