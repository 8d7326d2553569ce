"""The dataset card of a filtered source: ``filtered/<source>/README.md`` in the Hugging Face dataset-card form.

YAML front matter (license placeholder, size category, task tags, and a ``unifilter`` block with the figures),
then what was filtered and how: the source tars and their fingerprints, the checkpoint and model fingerprint, the
threshold (mode, value, keep fraction, when it was chosen), kept and removed counts by reason, the score
histogram, the filtered tars written so far, and the catalog query that gives the lineage. Every count comes from
the catalog (``score_stats``, ``thresholds``, ``tars``) and the filtered tars' manifests, so the card agrees with
them; it is rewritten whenever a partition of the source is filtered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from unifilter_core import paths, storage
from unifilter_core.catalog.schema import HIST_EDGES

CARD_NAME = "README.md"
_TASKS = {"caption": ["image-to-text", "text-to-image"], "interleaved": ["image-text-to-text"]}
_SHOWN_TARS = 50


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):  # fmt: skip
        if n < limit:
            return label
    return "1B<n<10B"


def card_figures(catalog: Any, source: str, threshold: dict[str, Any]) -> dict[str, Any]:
    """The card's figures from the catalog: samples and ok rows (``score_stats``), kept and below-threshold
    counts (the chosen ``thresholds`` row), removed rows by reason, the summed histogram, the model fingerprints."""
    _, rows = catalog.query(
        "SELECT count(*), coalesce(sum(n_rows), 0), coalesce(sum(n_ok), 0), "
        "string_agg(DISTINCT model_fingerprint, ',' ORDER BY model_fingerprint) FROM score_stats WHERE source = ?",
        [source],
    )
    tars, samples, ok, fingerprints = rows[0]
    _, reasons = catalog.query(
        "SELECT key, sum(value) FROM (SELECT unnest(map_keys(reasons)) AS key, unnest(map_values(reasons)) AS value "
        "FROM score_stats WHERE source = ?) GROUP BY key ORDER BY key",
        [source],
    )
    _, hist = catalog.query(
        "SELECT i, sum(histogram[i]) FROM score_stats, range(1, 31) AS r(i) WHERE source = ? GROUP BY i ORDER BY i",
        [source],
    )
    kept = int(threshold.get("kept") or 0)
    removed = {str(reason): int(n) for reason, n in reasons}
    removed["below_threshold"] = int(ok) - kept
    return {
        "tars_scored": int(tars),
        "samples": int(samples),
        "ok": int(ok),
        "kept": kept,
        "removed": int(samples) - kept,
        "removed_by_reason": removed,
        "histogram": [int(n) for _, n in hist],
        "model_fingerprint": fingerprints,
    }


def _tar_fingerprint(table: str) -> str | None:
    """The input tar's fingerprint its score manifest recorded (sha256, or a store's etag)."""
    from unifilter_core.catalog.stats import manifest_of

    try:
        doc = json.loads(storage.read_text(manifest_of(storage.location(table))))
    except (OSError, ValueError):
        return None
    return (doc.get("tar") or {}).get("fingerprint") if isinstance(doc, dict) else None


def _filtered_manifests(folder: Any) -> list[dict[str, Any]]:
    if not folder.is_dir():
        return []
    docs = []
    for path in sorted(folder.glob("*.manifest.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return docs


def render_card(source: str, kind: str, figures: dict[str, Any], threshold: dict[str, Any],
                tars: list[tuple[str, str, str | None]], written: list[dict[str, Any]]) -> str:  # fmt: skip
    """The card's text (front matter, then the body)."""
    front = {
        "license": "other",  # placeholder: the license of the source data applies; set it before publishing
        "pretty_name": f"{source}, filtered with UniFilter",
        "size_categories": [_size_category(figures["kept"])],
        "task_categories": _TASKS.get(kind, []),
        "tags": ["unifilter", "data-filtering", "webdataset", "multimodal"],
        "unifilter": {
            "source": source,
            "kind": kind,
            "threshold": threshold.get("threshold"),
            "mode": threshold.get("mode"),
            "keep_fraction": threshold.get("keep_fraction"),
            "method": threshold.get("method"),
            "chosen_at": threshold.get("scored_at"),
            **{k: v for k, v in figures.items() if k != "histogram"},
        },
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [
        f"# {source}, filtered with UniFilter",
        "",
        f"The samples of the `{source}` tars ({kind}) whose UniFilter quality score is at least "
        f"**{threshold.get('threshold')}**, as webdataset tars with their original members and keys (one filtered "
        "tar per input tar, `<stem>.tar`, with `<stem>.manifest.json`; caption tars with DataComp uids also get "
        "`<stem>.uids.npy`, the DataComp resharder's subset format).",
        "",
        "## How it was filtered",
        "",
        f"- Classifier: model fingerprint `{figures['model_fingerprint']}` (sha256 of its config, weights and "
        "tokenizer).",
        f"- Threshold: mode `{threshold.get('mode')}`, keep fraction {threshold.get('keep_fraction')}, value "
        f"{threshold.get('threshold')} (method `{threshold.get('method')}`), chosen {threshold.get('scored_at')}. "
        "A sample is kept when its status is `ok` and its score is at or above the threshold.",
        f"- Scored: {figures['samples']} samples in {figures['tars_scored']} tars; {figures['ok']} scored `ok`; "
        f"kept **{figures['kept']}**, removed {figures['removed']}.",
        "",
        "| removed because | samples |",
        "|---|---|",
        *[f"| `{reason}` | {n} |" for reason, n in sorted(figures["removed_by_reason"].items())],
        "",
        "## Score histogram (ok samples)",
        "",
        "| score | samples |",
        "|---|---|",
        *[
            f"| {HIST_EDGES[i]:.1f} to {HIST_EDGES[i + 1]:.1f} | {n} |"
            for i, n in enumerate(figures["histogram"])
            if n
        ],
        "",
        "## Source tars",
        "",
        "| partition | tar | sha256 / etag |",
        "|---|---|---|",
        *[f"| `{key}` | `{path}` | `{fp or '-'}` |" for key, path, fp in tars[:_SHOWN_TARS]],
    ]
    if len(tars) > _SHOWN_TARS:
        lines.append(f"| ... {len(tars) - _SHOWN_TARS} more: see the lineage query | | |")
    lines += [
        "",
        f"## Filtered tars written so far: {len(written)}",
        "",
        f"Kept {sum(int(m.get('kept', 0)) for m in written)} samples and dropped "
        f"{sum(int(m.get('dropped', 0)) for m in written)} in these tars.",
        "",
        "## Lineage",
        "",
        'From the platform\'s DuckDB catalog (`unifilter catalog sql "..."`):',
        "",
        "```sql",
        "SELECT t.partition_key, t.path, t.fingerprint, s.model_fingerprint, s.n_rows, s.n_ok, l.run_id, l.finished_at",
        "FROM tars t JOIN score_stats s USING (partition_key)",
        "LEFT JOIN lineage l ON l.asset_key = 'scores' AND l.partition_key = t.partition_key",
        f"WHERE t.source = '{source}' ORDER BY t.partition_key;",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(root: Path, catalog: Any, source: str, kind: str, *, tables: Any = None) -> Any:
    """Write ``<tables>/filtered/<source>/README.md`` from the catalog and the filtered manifests; returns its
    location.

    Raises:
        ValueError: no threshold chosen for the source (``thresholds.json``).
    """
    from unifilter_core.partition_steps import read_thresholds, tables_location

    thresholds = read_thresholds(root)
    if source not in thresholds:
        raise ValueError(f"no threshold chosen for source {source!r}: materialize quality_threshold first")
    threshold = thresholds[source]
    figures = card_figures(catalog, source, threshold)
    _, tars = catalog.query(
        "SELECT t.partition_key, t.path, s.score_path FROM tars t JOIN score_stats s USING (partition_key) "
        "WHERE t.source = ? ORDER BY t.partition_key",
        [source],
    )
    shown = [(key, path, _tar_fingerprint(table)) for key, path, table in tars[:_SHOWN_TARS]]
    shown += [(key, path, None) for key, path, _ in tars[_SHOWN_TARS:]]
    where = tables_location(root, tables, catalog)
    folder = paths.filtered_dir(where, source)
    text = render_card(source, kind, figures, threshold, shown, _filtered_manifests(folder))
    card = folder / CARD_NAME
    storage.write_text(card, text)
    return card


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (between the first two ``---`` lines)."""
    if not text.startswith("---\n"):
        raise ValueError("a dataset card starts with a '---' line")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])
