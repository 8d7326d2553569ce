"""The threshold workbench: one self-contained HTML page built from the catalog (``unifilter report``).

Per source it shows the score distribution, a threshold control that updates kept counts live, galleries of
sample thumbnails (lowest scores, around the threshold, highest scores) read back from the source tars, the
quarantine counts by reason, the drift flags of the tars, the classifier's calibration and a lineage summary. See docs/workbench.md::

    from unifilter_core.report import WorkbenchConfig, write_workbench
    path = write_workbench(catalog, WorkbenchConfig(keep_fraction=0.3))   # <root>/report/workbench.html
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from unifilter_core.catalog import Catalog
from unifilter_core.fileio import atomic_write_bytes
from unifilter_core.report.data import (
    SampleRef,
    SourceData,
    WorkbenchConfig,
    collect_calibration,
    collect_drift,
    collect_lineage,
    collect_sources,
    tar_index,
)
from unifilter_core.report.gallery import attach_previews, thumbnail_data_uri
from unifilter_core.report.html import render_html, slug

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkbenchSummary:
    """What :func:`write_workbench` wrote.

    Attributes:
        path: the HTML file.
        n_sources: sources shown.
        n_thumbnails: gallery samples with a thumbnail.
        size_bytes: size of the page.
    """

    path: Path
    n_sources: int
    n_thumbnails: int
    size_bytes: int


def default_report_path(root: Path) -> Path:
    """``<root>/report/workbench.html``."""
    return Path(root) / "report" / "workbench.html"


def build_workbench(catalog: Catalog, config: WorkbenchConfig | None = None) -> tuple[str, int, int]:
    """Build the page from the catalog.

    Returns:
        (HTML text, number of sources, number of thumbnails).

    Raises:
        ValueError: invalid ``config``.
    """
    config = config or WorkbenchConfig()
    config.validate()
    sources = collect_sources(catalog, config)
    refs = [r for s in sources for refs in s.bands.values() for r in refs]
    n_thumbs = attach_previews(refs, tar_index(catalog), catalog.root, config)
    page = render_html(sources, collect_lineage(catalog), config, root=catalog.root, drift=collect_drift(catalog),
                       calibration=collect_calibration(catalog))  # fmt: skip
    return page, len(sources), n_thumbs


def write_workbench(
    catalog: Catalog, config: WorkbenchConfig | None = None, out: str | os.PathLike[str] | None = None
) -> WorkbenchSummary:
    """Build the page and write it atomically to ``out`` (default :func:`default_report_path`)."""
    page, n_sources, n_thumbs = build_workbench(catalog, config)
    path = Path(out) if out is not None else default_report_path(catalog.root)
    data = page.encode("utf-8")
    atomic_write_bytes(path, data, mode=0o644)  # the temporary file is 0600; the page is for sharing
    logger.info(
        "workbench: %d source(s), %d thumbnail(s), %.0f KB -> %s", n_sources, n_thumbs, len(data) / 1e3, path
    )
    return WorkbenchSummary(path=path, n_sources=n_sources, n_thumbnails=n_thumbs, size_bytes=len(data))


__all__ = [
    "SampleRef",
    "SourceData",
    "WorkbenchConfig",
    "WorkbenchSummary",
    "build_workbench",
    "default_report_path",
    "slug",
    "thumbnail_data_uri",
    "write_workbench",
]
