"""Tests of the threshold workbench (unifilter_core.report, `unifilter report`) and unifilter_core.progress.

``build_report_root`` builds a tiny data root with a catalog (also used by tests/browser): four sources:
``datacomp`` (two caption tars; 10 ok, 1 skipped, 1 error rows), ``obelics`` (one interleaved tar, 4 ok),
``broken`` (one tar, every row an error) and ``pending`` (registered, never scored).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.tarfixtures import caption_members, jpeg_bytes, write_interleaved_tar, write_tar
from unifilter_core.catalog import Catalog, TarRecord
from unifilter_core.cli import main as cli_main
from unifilter_core.progress import PROGRESS_ENV, progress, progress_enabled
from unifilter_core.report import WorkbenchConfig, build_workbench, default_report_path, write_workbench

HOSTILE = "<b>bold</b></script><script>alert(1)</script>"
#: datacomp ok scores by key number; key 6 is skipped and key 7 an error.
DATACOMP = {0: 0.1, 1: 0.5, 2: 0.9, 3: 1.3, 4: 1.7, 5: 2.1, 8: 0.3, 9: 1.1, 10: 2.5, 11: 2.9}


def _score_table(root: Path, source: str, num: int, rows: list[dict[str, Any]]) -> Path:
    n = len(rows)
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "source": [source] * n,
            "partition_key": [f"{source}_{num:04d}"] * n,
            "uid": [f"uid-{r['key']}" for r in rows],
            "url": [f"https://example.com/{r['key']}.jpg" for r in rows],
            "score": pa.array([r.get("score") for r in rows], pa.float32()),
            "status": [r.get("status", "ok") for r in rows],
            "reason": [r.get("reason") for r in rows],
            "n_images": pa.array([1] * n, pa.int32()),
            "n_tokens": pa.array([12] * n, pa.int32()),
            "truncated": [False] * n,
            "model_fingerprint": ["fp-test"] * n,
            "detail": [None] * n,
        }
    )
    path = root / "scores" / source / f"{num:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _caption_tar(path: Path, keys: list[int]) -> Path:
    members = []
    for i in keys:
        text = HOSTILE if i == 11 else f"caption {i}"
        members += caption_members(f"{i:09d}", image=jpeg_bytes((48, 32), (i * 20 % 256, 90, 150)), text=text)
    return write_tar(path, members)


def build_report_root(root: Path) -> Catalog:
    """The tiny data root described in the module docstring, registered and summarised in its catalog."""
    src = root / "sources"
    _caption_tar(src / "datacomp" / "00000000.tar", list(range(8)))
    _caption_tar(src / "datacomp" / "00000001.tar", [8, 9, 10, 11])
    write_interleaved_tar(src / "obelics" / "00000000.tar", n=4)
    _caption_tar(src / "broken" / "00000000.tar", [0, 1, 2])
    _caption_tar(src / "pending" / "00000000.tar", [0])
    catalog = Catalog(root=root)
    catalog.register_tars(
        TarRecord(f"{s}_{n:04d}", s, f"sources/{s}/{n:08d}.tar", kind=kind)
        for s, n, kind in [
            ("datacomp", 0, "caption"),
            ("datacomp", 1, "caption"),
            ("obelics", 0, "interleaved"),
            ("broken", 0, "caption"),
            ("pending", 0, "caption"),
        ]
    )
    dc0 = [{"key": f"{i:09d}", "score": DATACOMP[i]} for i in range(6)]
    dc0 += [
        {"key": f"{6:09d}", "status": "skipped", "reason": "too_many_tokens"},
        {"key": f"{7:09d}", "status": "error", "reason": "image_decode_error"},
    ]
    dc1 = [{"key": f"{i:09d}", "score": DATACOMP[i]} for i in (8, 9, 10, 11)]
    ob = [{"key": f"doc{i:05d}", "score": 1.0 + i / 2} for i in range(4)]
    br = [{"key": f"{i:09d}", "status": "error", "reason": "tar_truncated"} for i in range(3)]
    for source, num, rows in [
        ("datacomp", 0, dc0),
        ("datacomp", 1, dc1),
        ("obelics", 0, ob),
        ("broken", 0, br),
    ]:
        path = _score_table(root, source, num, rows)
        catalog.record_score_stats(f"{source}_{num:04d}", path)
        catalog.record_lineage(
            "scores", f"{source}_{num:04d}", "run-1", status="success", row_count=len(rows)
        )
    return catalog


def payload_of(page: str) -> dict[str, Any]:
    """The JSON payload embedded in a workbench page."""
    m = re.search(r'<script type="application/json" id="workbench-data">(.*?)</script>', page, re.S)
    assert m, "no workbench-data script in the page"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def report_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report_root")
    build_report_root(root)
    return root


@pytest.fixture(scope="module")
def page(report_root: Path) -> str:
    return build_workbench(Catalog(root=report_root), WorkbenchConfig(samples_per_band=3))[0]


def _sources(page: str) -> dict[str, dict[str, Any]]:
    return {s["source"]: s for s in payload_of(page)["sources"]}


def test_every_source_is_listed_with_its_counts(page: str) -> None:
    sources = _sources(page)
    assert sorted(sources) == ["broken", "datacomp", "obelics", "pending"]
    assert re.search(r'data-testid="summary-ok-datacomp">10<', page)
    assert re.search(r'data-testid="summary-skipped-datacomp">1<', page)
    assert re.search(r'data-testid="summary-error-datacomp">1<', page)
    assert re.search(r'data-testid="summary-error-broken">3<', page)
    assert sources["pending"]["n_ok"] == 0 and sources["broken"]["n_ok"] == 0
    assert sources["broken"]["default_threshold"] is None and sources["broken"]["bands"] == {}


def test_embedded_scores_are_exact_and_default_threshold_matches_catalog(
    report_root: Path, page: str
) -> None:
    dc = _sources(page)["datacomp"]
    assert dc["exact"] is True
    scores = np.frombuffer(base64.b64decode(dc["scores_b64"]), dtype="<f4")
    np.testing.assert_array_equal(scores, np.sort(np.array(list(DATACOMP.values()), dtype=np.float32)))
    rows = {r.source: r for r in Catalog(root=report_root).compute_threshold(keep_fraction=0.3, record=False)}
    assert dc["default_threshold"] == rows["datacomp"].threshold
    assert int((scores >= dc["default_threshold"]).sum()) == rows["datacomp"].kept == 3
    assert re.search(r'data-testid="summary-kept-datacomp">3<', page)


def test_gallery_bands_carry_thumbnails_and_text_from_the_tars(page: str) -> None:
    dc = _sources(page)["datacomp"]
    assert [r["score"] for r in dc["bands"]["lowest"]] == pytest.approx([0.1, 0.3, 0.5])
    assert [r["score"] for r in dc["bands"]["highest"]] == pytest.approx([2.9, 2.5, 2.1])
    for ref in dc["bands"]["lowest"]:
        assert ref["text"] == f"caption {int(ref['key'])}"
        head, b64 = ref["thumb"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "JPEG" and img.size == (48, 32)
    pool = [r["score"] for r in dc["bands"]["pool"]]
    assert pool == sorted(pool) and len(pool) >= 3
    ob = _sources(page)["obelics"]
    assert all(
        r["thumb"] and r["text"].startswith("intro") and r["n_images"] == 2 for r in ob["bands"]["lowest"]
    )


def test_quarantine_and_lineage_sections(page: str) -> None:
    q = re.search(r'data-testid="quarantine-datacomp">(.*?)</table>', page, re.S)
    assert q and re.search(r"image_decode_error</td><td class=num>1<", q.group(1))
    assert re.search(r"too_many_tokens</td><td class=num>1<", q.group(1))
    broken = re.search(r'data-testid="quarantine-broken">(.*?)</table>', page, re.S)
    assert broken and re.search(r"tar_truncated</td><td class=num>3<", broken.group(1))
    lineage = re.search(r'data-testid="lineage-table">(.*?)</table>', page, re.S)
    assert lineage and "<td>scores</td><td class=num>4</td>" in lineage.group(1)


def test_page_is_self_contained_and_hostile_text_stays_inert(page: str) -> None:
    assert page.count("</script>") == 2  # the JSON payload and the app script; the caption cannot close one
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    assert "default-src 'none'" in page
    hostile = [r for r in _sources(page)["datacomp"]["bands"]["highest"] if r["key"] == f"{11:09d}"]
    assert hostile and hostile[0]["text"] == HOSTILE
    assert "textContent" in page and "innerHTML" not in page


def test_missing_tar_and_approximate_mode(tmp_path: Path) -> None:
    catalog = build_report_root(tmp_path)
    (tmp_path / "sources" / "datacomp" / "00000001.tar").unlink()
    page, n_sources, n_thumbs = build_workbench(
        catalog, WorkbenchConfig(samples_per_band=2, max_exact_scores=4)
    )
    dc = _sources(page)["datacomp"]
    top = dc["bands"]["highest"][0]
    assert top["thumb"] is None and top["note"].startswith("tar missing")
    assert dc["bands"]["lowest"][0]["thumb"]  # key 0 lives in the tar that is still there
    assert dc["exact"] is False and dc["scores_b64"] is None and sum(dc["fine_hist"]) == 10
    assert n_sources == 4 and n_thumbs > 0


def test_empty_catalog_and_no_samples(tmp_path: Path) -> None:
    page, n_sources, n_thumbs = build_workbench(Catalog(root=tmp_path), WorkbenchConfig(samples_per_band=0))
    assert (n_sources, n_thumbs) == (0, 0)
    assert 'data-testid="no-sources"' in page and payload_of(page)["sources"] == []
    with pytest.raises(ValueError, match="keep_fraction"):
        build_workbench(Catalog(root=tmp_path), WorkbenchConfig(keep_fraction=0))


def test_write_workbench_default_path(tmp_path: Path) -> None:
    catalog = build_report_root(tmp_path)
    summary = write_workbench(catalog, WorkbenchConfig(samples_per_band=1))
    assert summary.path == default_report_path(tmp_path) == tmp_path / "report" / "workbench.html"
    assert summary.path.stat().st_size == summary.size_bytes and summary.n_sources == 4
    assert not [p for p in summary.path.parent.iterdir() if p.name != "workbench.html"]  # no temp files left


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_report_root(tmp_path)
    out = tmp_path / "wb.html"
    rc = cli_main(
        ["report", "--root", str(tmp_path), "--out", str(out), "--keep", "0.5", "--samples-per-band", "2"]
    )
    assert rc == 0 and out.is_file()
    assert f"file://{out.resolve()}" in capsys.readouterr().out
    payload = payload_of(out.read_text(encoding="utf-8"))
    assert payload["keep_fraction"] == 0.5 and payload["samples_per_band"] == 2
    dc = {s["source"]: s for s in payload["sources"]}["datacomp"]
    assert dc["default_threshold"] == pytest.approx(1.3)  # k = 5 of 10: the 5th highest score


def test_cli_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", "--root", str(tmp_path / "nothing")]) == 2
    assert "no catalog" in capsys.readouterr().err
    Catalog(root=tmp_path)
    assert cli_main(["report", "--root", str(tmp_path), "--keep", "1.5"]) == 2
    assert "keep_fraction" in capsys.readouterr().err


# -- progress ---------------------------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_quiet_unless_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_enabled(_Stream(tty=False)) is False
    assert progress_enabled(_Stream(tty=True)) is True
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert progress_enabled(_Stream(tty=True)) is False
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled(_Stream(tty=False)) is True


def test_progress_writes_nothing_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "0")
    quiet = _Stream(tty=True)
    assert list(progress(range(5), desc="x", file=quiet)) == [0, 1, 2, 3, 4]
    assert quiet.getvalue() == ""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    loud = _Stream(tty=True)
    with progress(total=3, desc="work", file=loud, leave=True) as bar:
        bar.update(3)
    assert "work" in loud.getvalue() and "3/3" in loud.getvalue()


def test_templates_ship_as_package_data_and_render_strictly() -> None:
    """Every template file is matched by pyproject's package-data (so wheels carry it); a missing variable is an
    error, not an empty string."""
    import fnmatch
    from importlib import resources

    import jinja2
    import tomllib

    from unifilter_core.report.html import TEMPLATE, _environment

    folder = resources.files("unifilter_core.report").joinpath("templates")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert TEMPLATE in names and "workbench.css" in names and "workbench.js" in names
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["unifilter_core"]
    for name in names:
        assert any(fnmatch.fnmatch(f"report/templates/{name}", g) for g in globs), name
    with pytest.raises(jinja2.UndefinedError):
        _environment().get_template(TEMPLATE).render()


def test_table_cells_are_escaped_by_the_template(tmp_path: Path) -> None:
    from unifilter_core.report.html import render_html

    hostile = "</script><script>alert(1)</script>"
    page = render_html([], [{"asset_key": hostile, "rows": 3}], WorkbenchConfig(), root=tmp_path / hostile)
    assert hostile not in page and "&lt;/script&gt;&lt;script&gt;alert(1)" in page
