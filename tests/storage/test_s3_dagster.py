"""The Dagster assets with sources, score tables and filtered tars in an S3 bucket (moto's server on 127.0.0.1).

The catalog DuckDB file stays in the local data root and reads the tables from the bucket; the filtered tars are
read back by stock webdataset from presigned URLs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.conftest import failure_message, make_resources, materialize
from tests.storage.conftest import FAKE_KEY_ID, FAKE_SECRET
from tests.tarfixtures import write_caption_tar, write_interleaved_tar


def _fs():
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def _resources(root: Path, ckpt: Path, bucket: str) -> dict:
    from unifilter_dagster.resources import SourceConfig, UniFilterHome

    resources = make_resources(root, ckpt, [])
    resources["home"] = UniFilterHome(
        root=str(root),
        use_world=False,
        sources=[
            SourceConfig(name="cap", kind="caption", path=f"s3://{bucket}/sources/cap"),
            SourceConfig(name="doc", kind="interleaved", path=f"s3://{bucket}/sources/doc/"),
        ],
        tables=f"s3://{bucket}/unifilter",
    )
    return resources


@pytest.fixture
def s3_sources(bucket: str, tmp_path: Path) -> str:
    local = tmp_path / "upload"
    for i in range(2):
        write_caption_tar(local / "cap" / f"{i:08d}.tar", n=6, start=10 * i)
    write_interleaved_tar(local / "doc" / "00000007.tar", n=3)
    fs = _fs()
    for path in sorted(local.rglob("*.tar")):
        fs.put_file(str(path), f"{bucket}/sources/{path.parent.name}/{path.name}")
    return bucket


def test_assets_score_threshold_and_filter_on_s3(
    s3_sources: str, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    import dagster as dg
    import webdataset as wds

    from unifilter_core.catalog import Catalog
    from unifilter_dagster.assets.tars import filtered_dataset, quality_threshold, scores, tar_manifest

    bucket = s3_sources
    root = tmp_path / "root"
    resources = _resources(root, tiny_checkpoint, bucket)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        keys = sorted(instance.get_dynamic_partitions("tars"))
        assert keys == ["cap_0000", "cap_0001", "doc_0007"]
        for key in keys:
            result = materialize([scores], resources, instance, key)
            assert result.success, failure_message(result)
        again = materialize([scores], resources, instance, "cap_0001")
        assert again.success
        meta = again.asset_materializations_for_node("scores")[0].metadata
        assert meta["resumed"].value is True  # the request key in the bucket's manifest answered it

        fs = _fs()
        listed = {Path(p).name for p in fs.ls(f"{bucket}/unifilter/scores/cap")}
        assert {"00000000.parquet", "00000000.manifest.json", "00000001.parquet", ".source.json"} <= listed
        assert not (root / "scores").exists()  # nothing of the tables in the local data root
        catalog = Catalog(root / "unifilter.duckdb", root=root, tables=f"s3://{bucket}/unifilter")
        _, rows = catalog.query("SELECT partition_key, count(*) FROM scores GROUP BY ALL ORDER BY ALL")
        assert rows == [("cap_0000", 6), ("cap_0001", 6), ("doc_0007", 3)]
        _, stats = catalog.query("SELECT partition_key, n_rows, score_path FROM score_stats ORDER BY 1")
        assert [r[:2] for r in stats] == [("cap_0000", 6), ("cap_0001", 6), ("doc_0007", 3)]
        assert all(r[2].startswith(f"s3://{bucket}/unifilter/scores/") for r in stats)

        config = {"ops": {"quality_threshold": {"config": {"keep_fraction": 0.5}}}}
        assert dg.materialize(
            [quality_threshold], resources=resources, instance=instance, run_config=config
        ).success
        thresholds = json.loads((root / "thresholds.json").read_text())
        _, expected = catalog.query(
            "SELECT count(*) FROM scores WHERE source = 'cap' AND status = 'ok' AND score >= ?",
            [thresholds["cap"]["threshold"]],
        )
        result = materialize([filtered_dataset], resources, instance, "cap_0001")
        assert result.success, failure_message(result)

    manifest = json.loads(fs.cat(f"{bucket}/unifilter/filtered/cap/00000001.manifest.json"))
    assert manifest["path"] == f"s3://{bucket}/unifilter/filtered/cap/00000001.tar"
    url = fs.url(f"{bucket}/unifilter/filtered/cap/00000001.tar", expires=600)  # presigned HTTP URL
    samples = list(wds.WebDataset(url, shardshuffle=False))  # stock webdataset, through curl
    kept_keys = {s["__key__"] for s in samples}
    assert len(samples) == manifest["kept"] > 0
    _, table_keys = catalog.query(
        "SELECT key FROM scores WHERE partition_key = 'cap_0001' AND status = 'ok' AND score >= ?",
        [thresholds["cap"]["threshold"]],
    )
    assert kept_keys == {k for (k,) in table_keys}
    assert expected[0][0] >= manifest["kept"]
    for name in fs.find(f"{bucket}/unifilter"):  # credentials never reach what is written
        text = fs.cat(name).decode("latin-1")
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    assert FAKE_SECRET not in (root / "unifilter.duckdb").read_bytes().decode("latin-1")


def test_threshold_cli_reads_tables_in_the_bucket(
    s3_sources: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`unifilter thresholds` over the bucket: UNIFILTER_TABLES names it, the catalog stays local."""
    from unifilter_core.cli import main

    bucket = s3_sources
    root = tmp_path / "root"
    out = f"s3://{bucket}/unifilter/scores/cap"
    common = ["--model-path", str(tiny_checkpoint), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(["score", "caption", *common, "--tar-file-path", f"s3://{bucket}/sources/cap",
                 "--output-dir", out, "--root", str(root)]) == 0  # fmt: skip
    monkeypatch.setenv("UNIFILTER_TABLES", f"s3://{bucket}/unifilter")
    capsys.readouterr()
    assert main(["catalog", "refresh", "--root", str(root)]) == 0
    assert main(["thresholds", "--keep", "0.5", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "cap" in text and "12" in text  # 12 ok samples of source cap
