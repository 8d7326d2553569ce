"""Score drift of one tar against a reference distribution (PSI and KS over the fine score histograms).

Both sides are fine histograms (:data:`unifilter_core.catalog.schema.FINE_WIDTH` bins, the statistics every
manifest records), so a drift check reads no table. The reference is the scoring model's validation pairs of the
tar's kind (written by ``stage2_classifier``, :mod:`unifilter_core.calibration`) or the pooled histograms of tars
the user names.

* PSI (population stability index) over the reference's deciles: ``sum((p - q) * ln(p / q))``, each share floored
  at ``0.5 / n`` of its side; above 0.25 is the usual "material shift".
* KS: the largest gap between the two cumulative distributions, exact to one fine bin; its p-value from the
  asymptotic Kolmogorov distribution tells a shift from sampling noise in a small tar.

A tar is flagged when its scores shifted (PSI above the limit and KS significant at ``ks_alpha``) or when most of
its rows failed (``error_share`` above its limit): a broken shard, a spam crawl, another language, a swapped
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unifilter_core.catalog.schema import FINE_BINS

#: the reason codes of a flagged tar (``score_drift.reason``, comma-joined)
SHIFT, ERRORS, NO_REFERENCE, NO_SCORES = "score_shift", "error_share", "no_reference", "no_ok_scores"


@dataclass(frozen=True)
class DriftLimits:
    """When a tar is flagged.

    Attributes:
        psi: PSI above this (with a significant KS) is a shift; 0.25 is the usual material-shift line.
        ks_alpha: the KS p-value below which a gap is not sampling noise.
        error_share: share of ``error`` and ``skipped`` rows above which the tar is flagged.
    """

    psi: float = 0.25
    ks_alpha: float = 1e-3
    error_share: float = 0.5

    def __post_init__(self) -> None:
        if not self.psi > 0:
            raise ValueError(f"drift psi limit must be > 0, got {self.psi}")
        if not 0 < self.ks_alpha < 1:
            raise ValueError(f"drift ks_alpha must be in (0, 1), got {self.ks_alpha}")
        if not 0 < self.error_share <= 1:
            raise ValueError(f"drift error_share limit must be in (0, 1], got {self.error_share}")


@dataclass(slots=True)
class DriftRow:
    """One row of ``score_drift``: a tar against a reference."""

    partition_key: str
    source: str | None
    reference: str
    n: int
    n_reference: int
    psi: float | None
    ks: float | None
    ks_pvalue: float | None
    error_share: float
    flagged: bool
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dense(bins: Sequence[int], counts: Sequence[int]) -> np.ndarray:
    """A sparse fine histogram as a dense count vector of :data:`FINE_BINS` bins."""
    out = np.zeros(FINE_BINS, dtype=np.float64)
    np.add.at(out, np.asarray(bins, dtype=np.int64), np.asarray(counts, dtype=np.float64))
    return out


def psi(tar: np.ndarray, reference: np.ndarray, groups: int = 10) -> float:
    """PSI of dense histogram ``tar`` against ``reference`` over the reference's ``groups`` quantile groups of bins."""
    cum = np.cumsum(reference) / reference.sum()
    # bin index where each decile ends (bins never split: a group is a run of whole fine bins)
    edges = np.unique(np.searchsorted(cum, np.arange(1, groups) / groups, side="left"))
    splits = np.concatenate([[0], edges + 1, [FINE_BINS]])
    splits = np.unique(np.clip(splits, 0, FINE_BINS))
    p = np.add.reduceat(tar, splits[:-1]) / tar.sum()
    q = np.add.reduceat(reference, splits[:-1]) / reference.sum()
    p = np.maximum(p, 0.5 / tar.sum())
    q = np.maximum(q, 0.5 / reference.sum())
    return float(np.sum((p - q) * np.log(p / q)))


def ks(tar: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """KS statistic (to one bin) and its asymptotic p-value (Kolmogorov distribution, effective sample size)."""
    n, m = tar.sum(), reference.sum()
    d = float(np.max(np.abs(np.cumsum(tar) / n - np.cumsum(reference) / m)))
    en = math.sqrt(n * m / (n + m))
    from scipy.stats import kstwobign

    # Stephens' small-sample correction of the effective size, then the Kolmogorov distribution's tail
    return d, float(kstwobign.sf((en + 0.12 + 0.11 / en) * d))


def drift_row(
    partition_key: str,
    stats: dict[str, Any],
    reference: tuple[str, np.ndarray] | None,
    limits: DriftLimits,
) -> DriftRow:
    """Compare one tar's statistics (a ``score_stats`` row or manifest ``stats``) with ``(name, dense
    histogram)``; None reference: the row records ``no_reference`` and is not flagged for a shift."""
    n_rows = int(stats.get("n_rows") or 0)
    failed = int(stats.get("n_error") or 0) + int(stats.get("n_skipped") or 0)
    share = failed / n_rows if n_rows else 0.0
    reasons = [ERRORS] if share > limits.error_share else []
    tar = dense(stats.get("fine_bins") or [], stats.get("fine_counts") or [])
    name, value_psi, value_ks, pvalue, n_ref = "none", None, None, None, 0
    if reference is None:
        reasons.append(NO_REFERENCE)
    else:
        name, ref = reference
        n_ref = int(ref.sum())
        if tar.sum() == 0:
            reasons.append(NO_SCORES)
        elif n_ref:
            value_psi = psi(tar, ref)
            value_ks, pvalue = ks(tar, ref)
            if value_psi > limits.psi and pvalue < limits.ks_alpha:
                reasons.append(SHIFT)
    flagged = SHIFT in reasons or ERRORS in reasons
    return DriftRow(
        partition_key=partition_key, source=stats.get("source"), reference=name, n=int(tar.sum()),
        n_reference=n_ref, psi=value_psi, ks=value_ks, ks_pvalue=pvalue, error_share=round(share, 6),
        flagged=flagged, reason=",".join(reasons) or None,
    )  # fmt: skip


def reference_for(
    root: Any, catalog: Any, kind: str, model_fingerprint: str | None, reference_tars: Sequence[str] = ()
) -> tuple[str, np.ndarray] | None:
    """The reference of a tar of ``kind`` scored by ``model_fingerprint``: the pooled fine histograms of
    ``reference_tars`` (registered tar keys), else the model's validation pairs of that kind; None when there is
    neither."""
    if reference_tars:
        keys = list(reference_tars)
        _, rows = catalog.query(
            "SELECT fine_bins, fine_counts FROM score_stats WHERE partition_key IN (SELECT unnest(?::VARCHAR[]))",
            [keys],
        )
        if not rows:
            raise ValueError(
                f"drift reference tars {keys[:5]} have no statistics in the catalog: score them first"
            )
        total = sum(dense(b or [], c or []) for b, c in rows)
        return f"tars:{','.join(keys[:3])}{'...' if len(keys) > 3 else ''}", total
    from unifilter_core.reference import read_reference

    doc = read_reference(root, model_fingerprint)
    entry = ((doc or {}).get("kinds") or {}).get(kind)
    if not entry:
        return None
    return f"validation:{kind}", dense(entry["fine_bins"], entry["fine_counts"])


def check_tars(
    root: Any,
    catalog: Any,
    kind: str,
    stats: Sequence[dict[str, Any]],
    limits: DriftLimits,
    reference_tars: Sequence[str] = (),
) -> list[DriftRow]:
    """Drift rows of tars (their statistics, each with ``partition_key``), recorded in ``score_drift``."""
    from unifilter_core.catalog.ingest import record_drift

    rows: list[DriftRow] = []
    by_model: dict[str | None, list[dict[str, Any]]] = {}
    for one in stats:
        by_model.setdefault(one.get("model_fingerprint"), []).append(one)
    for fingerprint, group in by_model.items():
        reference = reference_for(root, catalog, kind, fingerprint, reference_tars)
        mine = [drift_row(one["partition_key"], one, reference, limits) for one in group]
        record_drift(catalog, mine, fingerprint)
        rows += mine
    return rows
