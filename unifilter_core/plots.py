"""Small plots and markdown tables for Dagster asset metadata (and anything else that wants a PNG).

Every ``*_png`` function draws with matplotlib's object API on an Agg canvas (no pyplot, no global state, safe
in worker processes without a display) and returns PNG bytes, kept small (about 400x260 px, under ~60 KB: the
image is re-encoded with a 256-colour palette when it would be larger). :func:`png_markdown` wraps the bytes in
a markdown image with a ``data:`` URI, which Dagster's markdown metadata renders inline::

    png = score_histogram_png(stats.histogram, stats.hist_edges, {"ok": 90, "skipped": 4, "error": 6})
    metadata["score_histogram"] = dg.MetadataValue.md(png_markdown(png, "score histogram"))

Inputs are plain Python/numpy values (the catalog's ``score_stats`` row, the stage-2 ``metrics.json``), so
nothing here imports the catalog, training code or dagster. Empty inputs give a figure that says "no data"
rather than an exception.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

#: Re-encode with a palette above this many bytes.
MAX_PNG_BYTES = 60_000
_FIGSIZE = (5.0, 3.2)
_DPI = 80
_STATUS_COLORS = {"ok": "#2e7d32", "skipped": "#f9a825", "error": "#c62828"}
_CDF_POINTS = 2000
_SOURCE_COLORS = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457")


# ---------------------------------------------------------------------------------------------- plumbing


def _figure(figsize: tuple[float, float] = _FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes, palette-quantised when larger than :data:`MAX_PNG_BYTES`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.05)
    data = buf.getvalue()
    if len(data) <= MAX_PNG_BYTES:
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _no_data(ax: Any, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def png_markdown(png: bytes, alt: str) -> str:
    """A markdown image with the PNG inline as a ``data:image/png;base64`` URI (Dagster's markdown renders it).

    Args:
        png: PNG bytes, e.g. from :func:`score_histogram_png`.
        alt: the alt text (brackets are stripped so they cannot break the markdown).
    """
    if not png.startswith(b"\x89PNG"):
        raise ValueError("png_markdown needs PNG bytes (they start with \\x89PNG)")
    clean = alt.replace("[", "").replace("]", "")
    return f"![{clean}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# ---------------------------------------------------------------------------------------------- markdown tables


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table; floats shown with 4 significant digits, None as an empty cell.

    Raises:
        ValueError: a row's length differs from the header's.
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, the header has {len(headers)}")
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def counts_markdown(counts: Mapping[str, int], *, key: str = "status", value: str = "rows") -> str:
    """A two-column table of counts with a share column, largest first (e.g. rows by status or reason)."""
    total = sum(int(v) for v in counts.values())
    rows = [
        (k, int(v), f"{int(v) / total:.1%}" if total else "")
        for k, v in sorted(counts.items(), key=lambda kv: (-int(kv[1]), kv[0]))
    ]
    return markdown_table([key, value, "share"], rows)


def per_level_accuracy(matrix: Sequence[Sequence[int]]) -> list[float | None]:
    """Recall of each true level (diagonal / row sum) of a confusion matrix; None for a level never true.

    Args:
        matrix: ``[L, L]`` counts, rows = true level, columns = predicted level.
    """
    m = _square(matrix)
    rows = m.sum(axis=1)
    return [float(m[i, i] / rows[i]) if rows[i] else None for i in range(m.shape[0])]


def classifier_metrics_markdown(metrics: Mapping[str, Any], labels: Sequence[str] | None = None) -> str:
    """Headline metrics and per-level accuracy of a stage-2 ``metrics.json`` (``best`` entry) as markdown."""
    best = metrics.get("best") or {}
    keys = ("accuracy", "macro_f1", "spearman", "macro_precision", "macro_recall", "n", "epoch")
    parts = [markdown_table(["metric", "value"], [(k, best[k]) for k in keys if k in best])]
    matrix = best.get("confusion_matrix")
    if matrix:
        acc = per_level_accuracy(matrix)
        names = list(labels) if labels else [f"level {i}" for i in range(len(acc))]
        if len(names) != len(acc):
            raise ValueError(f"{len(names)} labels for {len(acc)} levels")
        totals = _square(matrix).sum(axis=1)
        parts.append(
            markdown_table(
                ["level", "accuracy", "n"],
                [(n, a, int(t)) for n, a, t in zip(names, acc, totals, strict=True)],
            )
        )
    return "\n\n".join(parts)


def _square(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.int64)
    if m.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square [L, L], got shape {m.shape}")
    return m


# ---------------------------------------------------------------------------------------------- score tables


def score_histogram_png(
    hist_counts: Sequence[int],
    hist_edges: Sequence[float],
    counts_by_status: Mapping[str, int],
    *,
    title: str | None = None,
) -> bytes:
    """Per-tar score histogram (ok rows) beside a bar of row counts by status.

    Args:
        hist_counts: ``[B]`` counts per bin (``score_stats.histogram``).
        hist_edges: ``[B + 1]`` bin edges (``score_stats.hist_edges``).
        counts_by_status: e.g. ``{"ok": 90, "skipped": 4, "error": 6}``.
        title: figure title (e.g. the partition key).

    Raises:
        ValueError: ``len(hist_edges) != len(hist_counts) + 1`` (when there are counts).
    """
    counts = np.asarray(list(hist_counts), dtype=np.float64)
    edges = np.asarray(list(hist_edges), dtype=np.float64)
    if counts.size and edges.size != counts.size + 1:
        raise ValueError(f"{counts.size} histogram counts need {counts.size + 1} edges, got {edges.size}")
    fig = _figure((6.0, 3.0))
    ax, axs = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    if counts.size and counts.sum() > 0:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#1565c0", edgecolor="white")
        ax.set_xlabel("score")
        ax.set_ylabel("ok samples")
    else:
        _no_data(ax, "no ok scores")
    ax.set_title(title or "score histogram", fontsize=10)
    names = list(counts_by_status)
    values = [int(counts_by_status[n]) for n in names]
    if names:
        bars = axs.bar(names, values, color=[_STATUS_COLORS.get(n, "#757575") for n in names])
        axs.bar_label(bars, fontsize=8)
        axs.set_ylim(0, max(values + [1]) * 1.2)
        axs.tick_params(axis="x", labelsize=8)
    else:
        _no_data(axs)
    axs.set_title("rows by status", fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


# ---------------------------------------------------------------------------------------------- classifier


def training_curves_png(
    history: Sequence[Mapping[str, Any]],
    training_curve: Sequence[Mapping[str, Any]] | None = None,
    *,
    metrics: Sequence[str] = ("accuracy", "spearman", "macro_f1"),
) -> bytes:
    """Loss (left) and evaluation metrics (right) against epoch.

    Args:
        history: per-evaluation dicts (``metrics.json["history"]``) with ``epoch`` and metric keys; a
            ``loss`` or ``eval_loss`` key is drawn on the loss panel too.
        training_curve: optional per-logging-step dicts with ``epoch`` and ``loss``
            (``metrics.json["training_curve"]``).
        metrics: which history keys to draw; missing ones are left out.
    """
    fig = _figure((6.4, 3.0))
    ax_loss, ax_m = fig.subplots(1, 2)
    drew = False
    for rows, key, label in (
        (training_curve or [], "loss", "train loss"),
        (history, "loss", "loss"),
        (history, "eval_loss", "eval loss"),
    ):
        pts = _points(rows, key)
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None, label=label)
            drew = True
    if drew:
        ax_loss.set_xlabel("epoch")
        ax_loss.legend(fontsize=7)
    else:
        _no_data(ax_loss, "no loss logged")
    ax_loss.set_title("loss", fontsize=10)
    drew = False
    for key in metrics:
        pts = _points(history, key)
        if pts:
            ax_m.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=key)
            drew = True
    if drew:
        ax_m.set_xlabel("epoch")
        ax_m.legend(fontsize=7)
    else:
        _no_data(ax_m, "no evaluations")
    ax_m.set_title("validation", fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


def _points(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(epoch, value) pairs with finite values; the row index stands in for a missing epoch."""
    pts = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            epoch = row.get("epoch")
            pts.append((float(epoch) if isinstance(epoch, (int, float)) else float(i + 1), float(value)))
    return pts


def confusion_matrix_png(matrix: Sequence[Sequence[int]], labels: Sequence[str] | None = None) -> bytes:
    """Confusion matrix heat map (rows true, columns predicted) with counts, and per-level accuracy bars.

    Args:
        matrix: ``[L, L]`` counts.
        labels: ``L`` level names (default ``0..L-1``).

    Raises:
        ValueError: the matrix is not square or ``labels`` has the wrong length.
    """
    m = _square(matrix)
    n = m.shape[0]
    names = list(labels) if labels is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} labels for a {n}x{n} confusion matrix")
    fig = _figure((6.4, 3.0))
    ax, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    if n == 0:
        _no_data(ax)
        _no_data(ax_acc)
        return _to_png(fig)
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1))
    ax.set_xticks(range(n), names, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = m.max() / 2 if m.max() else 1
    for i in range(n):
        for j in range(n):
            color = "white" if m[i, j] > threshold else "black"
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8, color=color)
    ax.set_title("confusion matrix", fontsize=10)
    acc = per_level_accuracy(m)
    bars = ax_acc.bar(names, [a if a is not None else 0.0 for a in acc], color="#2e7d32")
    ax_acc.bar_label(bars, labels=[f"{a:.2f}" if a is not None else "n/a" for a in acc], fontsize=8)
    ax_acc.set_ylim(0, 1.15)
    ax_acc.set_xlabel("true level")
    ax_acc.set_title("per-level accuracy", fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


# ---------------------------------------------------------------------------------------------- thresholds


def threshold_cdf_png(
    scores_by_source: Mapping[str, Any],
    thresholds: Mapping[str, float],
    kept_share: Mapping[str, float],
) -> bytes:
    """Empirical CDF of the ok scores of each source, its threshold as a dashed line and the kept share.

    Args:
        scores_by_source: source -> ``[N]`` scores (any order; non-finite values are ignored).
        thresholds: source -> threshold (sources without one get no line).
        kept_share: source -> kept fraction in [0, 1], shown in the legend.
    """
    fig = _figure((5.6, 3.4))
    ax = fig.subplots()
    drew = False
    for i, source in enumerate(sorted(scores_by_source)):
        arr = np.asarray(scores_by_source[source], dtype=np.float64).reshape(-1)
        arr = np.sort(arr[np.isfinite(arr)])
        if arr.size == 0:
            continue
        color = _SOURCE_COLORS[i % len(_SOURCE_COLORS)]
        y = np.arange(1, arr.size + 1) / arr.size
        if arr.size > _CDF_POINTS:  # the curve cannot show more points than pixels: keep evenly spaced ranks
            idx = np.unique(np.linspace(0, arr.size - 1, _CDF_POINTS).round().astype(np.int64))
            arr, y = arr[idx], y[idx]
        t = thresholds.get(source)
        has_t = t is not None and math.isfinite(t)
        label = source + (f": threshold {t:.3g}" if has_t else "")
        if source in kept_share:
            label += f", keeps {kept_share[source]:.1%}"
        ax.step(arr, y, where="post", color=color, label=label)
        if has_t:
            ax.axvline(t, color=color, linestyle="--", linewidth=1)
        drew = True
    if drew:
        ax.set_xlabel("score")
        ax.set_ylabel("share of samples with score <= x")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="upper left")
    else:
        _no_data(ax, "no ok scores")
    ax.set_title("score CDF per source, threshold dashed", fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


__all__ = [
    "MAX_PNG_BYTES",
    "classifier_metrics_markdown",
    "confusion_matrix_png",
    "counts_markdown",
    "markdown_table",
    "per_level_accuracy",
    "png_markdown",
    "score_histogram_png",
    "threshold_cdf_png",
    "training_curves_png",
]


def drift_png(
    tar: Sequence[float], reference: Sequence[float], lo: float, width: float, *, title: str
) -> bytes:
    """A tar's score distribution over its reference's (dense fine histograms, each normalised), as step lines
    over bins ``lo + i * width`` regrouped ten to one."""
    fig = _figure((6.0, 3.0))
    ax = fig.subplots()
    drawn = False
    for values, label, colour in ((reference, "reference", "#9e9e9e"), (tar, "tar", "#1565c0")):
        counts = np.asarray(list(values), dtype=np.float64)
        if counts.sum() <= 0:
            continue
        coarse = np.add.reduceat(counts, np.arange(0, counts.size, 10)) / counts.sum()
        edges = lo + np.arange(coarse.size + 1) * width * 10
        ax.stairs(coarse, edges, label=label, color=colour, linewidth=1.5)
        drawn = True
    if drawn:
        ax.set_xlim(-0.5, 3.5)
        ax.set_xlabel("score")
        ax.set_ylabel("share of ok samples")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no ok scores")
    ax.set_title(title, fontsize=10)
    return _to_png(fig)
