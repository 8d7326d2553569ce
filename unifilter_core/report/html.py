"""Render the workbench page: static tables (summary, quarantine, lineage) in HTML, interactive parts from an
embedded JSON payload by the inline script of :mod:`~unifilter_core.report.assets`.

The page references no URL: styles, script, data and thumbnails (``data:`` URIs) are all inline, so it opens
from ``file://`` and can be mailed around.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from unifilter_core.report.assets import CSS, JS
from unifilter_core.report.data import SourceData, WorkbenchConfig


def slug(name: str) -> str:
    """A DOM-id-safe form of a source name (``[A-Za-z0-9_-]``; other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)


def source_payload(src: SourceData) -> dict[str, Any]:
    """The JSON the script needs for one source (scores as base64 little-endian float32, sorted)."""
    scores = None
    if src.exact and src.scores is not None:
        scores = base64.b64encode(np.ascontiguousarray(src.scores, dtype="<f4").tobytes()).decode("ascii")
    return {
        "source": src.source,
        "slug": slug(src.source),
        "n_ok": src.n_ok,
        "min": _float(src.score_min),
        "max": _float(src.score_max),
        "exact": src.exact,
        "scores_b64": scores,
        "fine_hist": src.fine_hist,
        "fine_edges": src.fine_edges,
        "default_threshold": _float(src.default.threshold) if src.default else None,
        "bands": {band: [asdict(r) for r in refs] for band, refs in src.bands.items()},
    }


def build_payload(sources: Sequence[SourceData], config: WorkbenchConfig) -> dict[str, Any]:
    """The page's JSON payload."""
    return {
        "keep_fraction": config.keep_fraction,
        "samples_per_band": config.samples_per_band,
        "sources": [source_payload(s) for s in sources],
    }


def _json_for_script(payload: dict[str, Any]) -> str:
    """JSON that cannot close or comment out its ``<script>`` element."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, testid: str, numeric: set[int]) -> str:
    head = "".join(
        f"<th{' class=num' if i in numeric else ''}>{html.escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = " class=num" if i in numeric else ""
            attrs = cell[1] if isinstance(cell, tuple) else ""
            value = cell[0] if isinstance(cell, tuple) else cell
            text = f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
            cells.append(f"<td{cls}{attrs}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table data-testid="{testid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _summary(sources: Sequence[SourceData], config: WorkbenchConfig) -> str:
    rows = []
    for s in sources:
        sl = slug(s.source)
        t = s.default.threshold if s.default else None
        rows.append(
            (
                (s.source, f' data-testid="summary-source-{sl}"'),
                s.kind or "",
                s.n_tars,
                s.n_scored_tars,
                (s.n_ok, f' data-testid="summary-ok-{sl}"'),
                (s.status_counts["skipped"], f' data-testid="summary-skipped-{sl}"'),
                (s.status_counts["error"], f' data-testid="summary-error-{sl}"'),
                t,
                s.default.kept if s.default else 0,
                (f"{t:.4f}" if t is not None else "", f' id="summary-threshold-{sl}"'),
                (
                    s.default.kept if s.default else 0,
                    f' id="summary-kept-{sl}" data-testid="summary-kept-{sl}"',
                ),
            )
        )
    headers = ["source", "kind", "tars", "scored tars", "ok", "skipped", "error",
               f"threshold (keep {config.keep_fraction:.0%})", "kept", "threshold (yours)", "kept (yours)"]  # fmt: skip
    return _table(headers, rows, testid="summary-table", numeric=set(range(2, 11)))


def _quarantine(sources: Sequence[SourceData]) -> str:
    parts = []
    for s in sources:
        total = sum(s.status_counts.values())
        if not s.reasons:
            continue
        rows = [
            ((reason, f' data-reason="{html.escape(reason)}"'), n, f"{n / total:.1%}" if total else "")
            for reason, n in s.reasons.items()
        ]
        parts.append(f"<h3>{html.escape(s.source)}</h3>")
        parts.append(_table(["reason", "rows", "share of rows"], rows, testid=f"quarantine-{slug(s.source)}",
                            numeric={1, 2}))  # fmt: skip
    return "".join(parts) or '<p class="muted" data-testid="quarantine-empty">Every row scored ok.</p>'


def _lineage(lineage: Sequence[dict[str, Any]]) -> str:
    if not lineage:
        return '<p class="muted" data-testid="lineage-empty">No materializations recorded yet.</p>'
    cols = [
        "asset_key",
        "materializations",
        "partitions",
        "rows",
        "statuses",
        "model_fingerprints",
        "last_finished",
    ]
    rows = [[r.get(c) for c in cols] for r in lineage]
    return _table(cols, rows, testid="lineage-table", numeric={1, 2, 3})


def render_html(
    sources: Sequence[SourceData],
    lineage: Sequence[dict[str, Any]],
    config: WorkbenchConfig,
    *,
    root: Path,
    generated_at: datetime | None = None,
) -> str:
    """The complete page as one string."""
    when = (generated_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    sections = "".join(
        f'<section class="source" id="source-{slug(s.source)}" data-source="{html.escape(s.source)}">'
        f"<h3>{html.escape(s.source)} <span class=muted>{s.n_ok} ok of {sum(s.status_counts.values())} rows, "
        f"{s.n_scored_tars}/{s.n_tars} tars scored</span></h3></section>"
        for s in sources
    )
    if not sources:
        sections = '<p class="muted" data-testid="no-sources">No tars registered and nothing scored yet.</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>UniFilter threshold workbench</title>
<style>{CSS}</style></head>
<body>
<header><h1>UniFilter threshold workbench</h1>
<p>data root {html.escape(str(root))} &middot; generated {when} &middot; default keep {config.keep_fraction:.0%}</p></header>
<main>
<h2>Sources</h2>
{_summary(sources, config)}
<h2>Thresholds</h2>
<p class="muted">Move a threshold: samples with score &ge; threshold are kept (ties included); skipped and error
rows are never kept. Your thresholds, for <code>unifilter thresholds --absolute X --source S</code>:</p>
<pre id="selection" data-testid="selection"></pre>
{sections}
<h2>Quarantine: rows not scored, by reason</h2>
{_quarantine(sources)}
<h2>Lineage</h2>
{_lineage(lineage)}
</main>
<script type="application/json" id="workbench-data">{_json_for_script(build_payload(sources, config))}</script>
<script>{JS}</script>
</body></html>
"""
