"""Render the workbench page from ``templates/workbench.html.j2`` (Jinja2, autoescaped): static tables (summary,
quarantine, lineage), and the interactive parts built from an embedded JSON payload by ``templates/workbench.js``
(which reads it from ``<script id="workbench-data" type="application/json">`` and inserts sample text with
``textContent`` only: captions are untrusted input).

The page references no URL: styles, script, data and thumbnails (``data:`` URIs) are all inline, so it opens
from ``file://`` and can be mailed around.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from unifilter_core.report.data import SourceData, WorkbenchConfig

TEMPLATE = "workbench.html.j2"


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


def _cell(value: Any, **attrs: str) -> dict[str, Any]:
    """One table cell for the template: its value (floats shown with 4 decimals) and its HTML attributes."""
    return {"value": value, "attrs": {k.replace("_", "-"): v for k, v in attrs.items()}}


def _summary(sources: Sequence[SourceData], config: WorkbenchConfig) -> dict[str, Any]:
    rows = []
    for s in sources:
        sl = slug(s.source)
        t = s.default.threshold if s.default else None
        kept = s.default.kept if s.default else 0
        rows.append(
            [
                _cell(s.source, data_testid=f"summary-source-{sl}"),
                _cell(s.kind or ""),
                _cell(s.n_tars),
                _cell(s.n_scored_tars),
                _cell(s.n_ok, data_testid=f"summary-ok-{sl}"),
                _cell(s.status_counts["skipped"], data_testid=f"summary-skipped-{sl}"),
                _cell(s.status_counts["error"], data_testid=f"summary-error-{sl}"),
                _cell(t),
                _cell(kept),
                _cell(f"{t:.4f}" if t is not None else "", id=f"summary-threshold-{sl}"),
                _cell(kept, id=f"summary-kept-{sl}", data_testid=f"summary-kept-{sl}"),
            ]
        )
    headers = ["source", "kind", "tars", "scored tars", "ok", "skipped", "error",
               f"threshold (keep {config.keep_fraction:.0%})", "kept", "threshold (yours)", "kept (yours)"]  # fmt: skip
    return {"headers": headers, "rows": rows, "numeric": list(range(2, 11))}


def _quarantine(sources: Sequence[SourceData]) -> list[dict[str, Any]]:
    out = []
    for s in sources:
        total = sum(s.status_counts.values())
        if not s.reasons:
            continue
        rows = [
            [_cell(reason, data_reason=reason), _cell(n), _cell(f"{n / total:.1%}" if total else "")]
            for reason, n in s.reasons.items()
        ]
        out.append({"source": s.source, "slug": slug(s.source), "rows": rows})
    return out


LINEAGE_COLUMNS = ("asset_key", "materializations", "partitions", "rows", "statuses", "model_fingerprints",
                   "last_finished")  # fmt: skip


def _lineage(lineage: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = [[_cell(r.get(c)) for c in LINEAGE_COLUMNS] for r in lineage]
    return {"headers": list(LINEAGE_COLUMNS), "rows": rows}


def _drift(drift: dict[str, Any]) -> dict[str, Any]:
    per_source = [
        [_cell(src or "-"), _cell(n), _cell(k, data_flagged=str(k))] for src, n, k in drift["per_source"]
    ]
    flagged = [[_cell(v) for v in row] for row in drift["flagged"]]
    return {"per_source": per_source, "flagged": flagged}


def _calibration(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for kind, entry in ((doc or {}).get("kinds") or {}).items():
        report = entry["calibration"]
        rows = [[_cell(r["level"]), _cell(r["n"]), _cell(_float(r["mean_score"])), _cell(_float(r["std_score"])),
                 _cell(_float(r["predicted_share"]))] for r in report["per_level"]]  # fmt: skip
        out.append({"kind": kind, "ece": _float(report["ece"]), "accuracy": _float(report["accuracy"]),
                    "n": report["n"], "rows": rows, "slug": slug(kind)})  # fmt: skip
    return out


@functools.cache
def _environment() -> jinja2.Environment:
    """Templates from the package's ``templates/`` folder; autoescaped; a missing variable is an error."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("unifilter_core.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("j2",), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _static(name: str) -> Markup:
    """A file of ``templates/`` inlined verbatim (the page's own CSS and script)."""
    return Markup(resources.files("unifilter_core.report").joinpath("templates", name).read_text("utf-8"))


def render_html(
    sources: Sequence[SourceData],
    lineage: Sequence[dict[str, Any]],
    config: WorkbenchConfig,
    *,
    root: Path,
    generated_at: datetime | None = None,
    drift: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> str:
    """The complete page as one string (``templates/workbench.html.j2``)."""
    when = (generated_at or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        {"slug": slug(s.source), "name": s.source, "n_ok": s.n_ok, "n_rows": sum(s.status_counts.values()),
         "n_scored_tars": s.n_scored_tars, "n_tars": s.n_tars}
        for s in sources
    ]  # fmt: skip
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            root=str(root),
            generated=when,
            keep_fraction=config.keep_fraction,
            summary=_summary(sources, config),
            sources=sections,
            quarantine=_quarantine(sources),
            lineage=_lineage(lineage),
            drift=_drift(drift or {"per_source": [], "flagged": []}),
            calibration=_calibration(calibration),
            payload=Markup(_json_for_script(build_payload(sources, config))),
            css=_static("workbench.css"),
            script=_static("workbench.js"),
        )
    )
