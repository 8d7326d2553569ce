"""Tar discovery, tar ids, block selection by id and partition resolution without listing the folder."""

from __future__ import annotations

import logging
import os
import pathlib
from pathlib import Path

import pytest

from unifilter_core.partition_steps import TarSource, discover_tar_records, resolve_partition
from unifilter_core.paths import parse_partition_key, partition_key, shard_id
from unifilter_core.scoring import discover_tars, select_block
from unifilter_core.scoring.discovery import candidate_names, compact_ranges


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_superscript_stem_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    _touch(tmp_path, "00000000.tar", "².tar", "notes.txt", "٣.tar")
    with caplog.at_level(logging.WARNING, logger="unifilter_core.scoring.discovery"):
        tars = discover_tars(tmp_path)
    assert [p.name for p in tars] == ["00000000.tar"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "².tar" in warnings[0] and "notes.txt" in warnings[0] and "٣.tar" in warnings[0]
    assert shard_id("².tar") is None
    with pytest.raises(ValueError, match="not of the form"):
        parse_partition_key("datacomp_²")


def test_mmc4_shard_names_are_accepted(tmp_path: Path) -> None:
    _touch(tmp_path, "shard_3.tar", "shard_10.tar")
    assert [p.name for p in discover_tars(tmp_path)] == ["shard_3.tar", "shard_10.tar"]
    assert partition_key("mmc4", tmp_path / "shard_3.tar") == "mmc4_0003"
    records = discover_tar_records(tmp_path, [TarSource("mmc4", "interleaved", str(tmp_path))])
    assert [r.partition_key for r in records] == ["mmc4_0003", "mmc4_0010"]


def test_compressed_shards_are_named_in_the_hint(tmp_path: Path) -> None:
    _touch(tmp_path, "00000000.tar.gz", "00000001.tgz")
    with pytest.raises(ValueError, match="no <number>.tar shards") as info:
        discover_tars(tmp_path)
    assert "found 00000000.tar.gz, 00000001.tgz: compressed shards are not read" in str(info.value)
    assert "gunzip -k" in str(info.value)


def test_symlinked_shard_keeps_the_link_name(tmp_path: Path) -> None:
    _touch(tmp_path / "real", "00000000.tar")
    (tmp_path / "real" / "00000007.tar").symlink_to(tmp_path / "real" / "00000000.tar")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    tars = discover_tars(tmp_path / "link")
    assert [p.name for p in tars] == ["00000000.tar", "00000007.tar"]
    assert tars[1].parent == (tmp_path / "real").resolve()
    assert discover_tars(tmp_path / "real" / "00000007.tar")[0].name == "00000007.tar"
    records = discover_tar_records(tmp_path, [TarSource("src", "caption", str(tmp_path / "real"))])
    assert [r.partition_key for r in records] == ["src_0000", "src_0007"]


@pytest.mark.parametrize("names", [("42.tar", "00000042.tar"), ("shard_42.tar", "42.tar")])
def test_two_files_of_one_id_are_refused_naming_both(tmp_path: Path, names: tuple[str, str]) -> None:
    _touch(tmp_path, *names)
    for call in (
        lambda: discover_tars(tmp_path),
        lambda: discover_tar_records(tmp_path, [TarSource("s", "caption", str(tmp_path))]),
        lambda: resolve_partition(tmp_path, [TarSource("s", "caption", str(tmp_path))], "s_0042"),
    ):
        with pytest.raises(ValueError, match="both tar id 42") as info:
            call()
        assert names[0] in str(info.value) and names[1] in str(info.value)


def test_block_selects_tar_ids_not_positions(tmp_path: Path) -> None:
    _touch(tmp_path, "00000000.tar", "00000002.tar", "00000005.tar")
    tars = discover_tars(tmp_path)
    assert [p.name for p in select_block(tars, 0, 2)] == ["00000000.tar"]
    assert [p.name for p in select_block(tars, 1, 2)] == ["00000002.tar"]
    assert [p.name for p in select_block(tars, 2, 2)] == ["00000005.tar"]
    assert select_block(tars, 3, 2) == []
    assert select_block(tars, 0, None) == tars


def test_compact_ranges() -> None:
    assert compact_ranges([9, 3, 4, 5, 6, 7, 7]) == "3-7, 9"
    assert compact_ranges([]) == ""
    assert compact_ranges(range(128, 256)) == "128-255"


def test_resolve_partition_probes_names_before_listing(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "sources" / "obelics"
    _touch(folder, "00000042.tar", "7.tar", "shard_9.tar", "0000000000000011.tar")
    specs = [TarSource("obelics", "interleaved")]
    real_iterdir = pathlib.Path.iterdir
    listed: list[Path] = []

    def counting_iterdir(self: Path):
        listed.append(self)
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", counting_iterdir)
    for key, name in (
        ("obelics_0042", "00000042.tar"),
        ("obelics_0007", "7.tar"),
        ("obelics_0009", "shard_9.tar"),
    ):
        spec, tar = resolve_partition(tmp_path, specs, key)
        assert (spec.name, tar) == ("obelics", folder.resolve() / name)
    assert listed == []  # found by probing candidate names only
    _, tar = resolve_partition(tmp_path, specs, "obelics_0011")  # 16 digits: past the probed widths
    assert tar.name == "0000000000000011.tar" and listed  # found by the fallback listing
    with pytest.raises(ValueError, match="no tar numbered 12"):
        resolve_partition(tmp_path, specs, "obelics_0012")
    assert candidate_names(42)[0] == "00000042.tar" and "shard_42.tar" in candidate_names(42)


def test_resolve_partition_keeps_a_symlinked_shard(tmp_path: Path) -> None:
    folder = tmp_path / "sources" / "obelics"
    _touch(folder, "00000000.tar")
    os.symlink(folder / "00000000.tar", folder / "00000003.tar")
    _, tar = resolve_partition(tmp_path, [TarSource("obelics", "interleaved")], "obelics_0003")
    assert tar == folder.resolve() / "00000003.tar"
