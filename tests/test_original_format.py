"""Score tables in the original scripts' form (``<NNNNNNNN>_quality_score.parquet``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from unifilter_core.records import Reason, ScoreResult
from unifilter_core.scoring.original_format import OriginalTableWriter, original_table_paths


@dataclass
class _Row:
    key: str
    result: ScoreResult
    meta: dict[str, Any] | None


def _rows() -> list[_Row]:
    ok = ScoreResult(score=2.5, n_images=1, n_tokens=20)
    bad = ScoreResult.failed(Reason.IMAGE_DECODE_ERROR, "cannot decode")
    return [
        _Row("000000001", ok, {"uid": "u1", "url": "http://a/1.jpg", "caption": "a cat", "key": "000000001",
                               "status": "success", "width": 32}),
        _Row("000000002", bad, {"uid": "u2", "url": "http://a/2.jpg", "caption": "dog \ud800", "status": "success",
                                "width": "32", "extra": {"nested": [1, 2]}}),
        _Row("000000003", ok, None),
    ]  # fmt: skip


def test_paths_follow_the_original_names(tmp_path: Path) -> None:
    table, manifest = original_table_paths(tmp_path, "/data/shards/00000042.tar")
    assert table == tmp_path / "00000042_quality_score.parquet"
    assert manifest == tmp_path / "00000042_quality_score.manifest.json"


def test_json_fields_plus_quality_score_readable_by_pandas(tmp_path: Path) -> None:
    path = tmp_path / "00000000_quality_score.parquet"
    with OriginalTableWriter(path, multi_label=False, metadata={"config_hash": "x"}) as writer:
        writer.write(_rows())
        assert writer.commit() == 3
    df = pd.read_parquet(path)
    assert list(df.columns[:4]) == ["uid", "url", "caption", "json_status"]
    assert {"key", "status", "reason", "quality_score", "flags", "width", "extra"} <= set(df.columns)
    assert "quality_class" not in df.columns
    assert df["uid"].tolist()[:2] == ["u1", "u2"] and pd.isna(df["uid"].iloc[2])
    assert df["quality_score"].iloc[0] == 2.5 and pd.isna(df["quality_score"].iloc[1])
    assert df["status"].tolist() == ["ok", "error", "ok"] and df["reason"].iloc[1] == "image_decode_error"
    assert df["json_status"].iloc[0] == "success"
    assert df["caption"].iloc[1] == "dog \\ud800"  # a lone surrogate is stored escaped
    assert df["width"].tolist()[:2] == ["32", '"32"']  # mixed int/str: JSON text, nothing lost
    kept = df[df["quality_score"] > 1.0]  # the downstream filter of the original's users
    assert kept["key"].tolist() == ["000000001", "000000003"]


def test_multi_label_heads_add_quality_class_and_expected_level(tmp_path: Path) -> None:
    path = tmp_path / "00000001_quality_score.parquet"
    result = ScoreResult(score=0.7, quality_class=1, expected_level=1.2)
    with OriginalTableWriter(path, multi_label=True) as writer:
        writer.write([_Row("k", result, {"key": "k"})])
        writer.commit()
    df = pd.read_parquet(path)
    assert df["quality_class"].tolist() == [1]
    assert abs(df["expected_level"].iloc[0] - 1.2) < 1e-6 and abs(df["quality_score"].iloc[0] - 0.7) < 1e-6


def test_leaving_without_commit_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "00000002_quality_score.parquet"
    with OriginalTableWriter(path, multi_label=False) as writer:
        writer.write(_rows())
    assert not list(tmp_path.iterdir())
