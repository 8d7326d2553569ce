"""Tests of unifilter_core.plots: valid, small PNGs for typical and edge inputs, and the markdown helpers."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from unifilter_core import plots

EDGES = [round(i / 10, 6) for i in range(31)]


def _open(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) <= plots.MAX_PNG_BYTES
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and 200 <= img.width <= 700 and 120 <= img.height <= 400
    return img


def _is_blank(img: Image.Image) -> bool:
    return len(set(img.convert("RGB").getdata())) < 3


@pytest.mark.parametrize(
    ("hist", "edges", "status"),
    [
        (list(range(30)), EDGES, {"ok": 435, "skipped": 4, "error": 6}),
        ([0] * 30, EDGES, {"ok": 0, "skipped": 0, "error": 3}),  # no ok rows
        ([], [], {}),  # nothing at all
        ([5] + [0] * 29, EDGES, {"ok": 5}),  # a single bin
    ],
)
def test_score_histogram_png(hist: list[int], edges: list[float], status: dict[str, int]) -> None:
    assert not _is_blank(_open(plots.score_histogram_png(hist, edges, status, title="datacomp_0001")))


def test_score_histogram_rejects_mismatched_edges() -> None:
    with pytest.raises(ValueError, match="edges"):
        plots.score_histogram_png([1, 2, 3], [0.0, 1.0], {"ok": 6})


def test_histogram_draws_the_data() -> None:
    a = np.asarray(Image.open(io.BytesIO(plots.score_histogram_png([0] * 29 + [50], EDGES, {"ok": 50}))))
    b = np.asarray(Image.open(io.BytesIO(plots.score_histogram_png([50] + [0] * 29, EDGES, {"ok": 50}))))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_training_curves_png() -> None:
    history = [
        {
            "epoch": e,
            "accuracy": 0.4 + e / 10,
            "spearman": 0.3 + e / 10,
            "macro_f1": 0.35 + e / 12,
            "loss": 1 / e,
        }
        for e in range(1, 5)
    ]
    curve = [{"epoch": s / 10, "step": s, "loss": 2.0 / (1 + s)} for s in range(40)]
    _open(plots.training_curves_png(history, curve))
    _open(plots.training_curves_png([]))  # no evaluation yet
    _open(plots.training_curves_png([{"accuracy": float("nan")}, {"accuracy": 0.5}]))  # no epoch, a NaN


def test_confusion_matrix_png_and_per_level_accuracy() -> None:
    m = [[5, 1, 0, 0], [1, 4, 2, 0], [0, 1, 6, 1], [0, 0, 0, 0]]
    _open(plots.confusion_matrix_png(m, ["0", "1", "2", "3"]))
    _open(plots.confusion_matrix_png([[0, 0], [0, 0]]))
    _open(plots.confusion_matrix_png([]))
    assert plots.per_level_accuracy(m) == pytest.approx([5 / 6, 4 / 7, 6 / 8, None])
    with pytest.raises(ValueError, match="square"):
        plots.confusion_matrix_png([[1, 2, 3]])
    with pytest.raises(ValueError, match="labels"):
        plots.confusion_matrix_png(m, ["a", "b"])


def test_threshold_cdf_png() -> None:
    rng = np.random.default_rng(0)
    scores = {"datacomp": rng.normal(1.5, 0.5, 50_000), "obelics": rng.normal(2.0, 0.3, 300), "empty": []}
    png = plots.threshold_cdf_png(
        scores, {"datacomp": 1.8, "obelics": 2.1}, {"datacomp": 0.3, "obelics": 0.31}
    )
    _open(png)
    _open(plots.threshold_cdf_png({}, {}, {}))
    _open(plots.threshold_cdf_png({"one": np.array([1.0, np.nan, np.inf])}, {"one": 1.0}, {"one": 1.0}))


def test_large_figures_are_quantised_below_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "MAX_PNG_BYTES", 5_000)
    rng = np.random.default_rng(1)
    png = plots.threshold_cdf_png({f"s{i}": rng.normal(i / 4, 1, 5000) for i in range(8)}, {}, {})
    img = Image.open(io.BytesIO(png))
    assert img.mode == "P"  # re-encoded with a palette


def test_png_markdown() -> None:
    png = plots.score_histogram_png([1] * 30, EDGES, {"ok": 30})
    md = plots.png_markdown(png, "score [histogram]")
    assert md.startswith("![score histogram](data:image/png;base64,") and md.endswith(")")
    assert base64.b64decode(md.split(",", 1)[1][:-1]) == png
    with pytest.raises(ValueError, match="PNG"):
        plots.png_markdown(b"GIF89a", "x")


def test_markdown_tables() -> None:
    table = plots.markdown_table(["a", "b"], [("x|y", 1.23456789), (None, 3)])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1.235 |", "|  | 3 |"]
    with pytest.raises(ValueError, match="cells"):
        plots.markdown_table(["a"], [(1, 2)])
    counts = plots.counts_markdown({"error": 1, "ok": 3})
    assert counts.splitlines()[2] == "| ok | 3 | 75.0% |"
    md = plots.classifier_metrics_markdown(
        {"best": {"accuracy": 0.75, "spearman": 0.5, "confusion_matrix": [[3, 1], [0, 0]]}}, ["low", "high"]
    )
    assert "| accuracy | 0.75 |" in md and "| low | 0.75 | 4 |" in md and "| high |  | 0 |" in md
