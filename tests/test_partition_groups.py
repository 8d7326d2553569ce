"""Tar-group partitions in the core: keys, the tars a key names, scoring a group with one model load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tarfixtures import write_caption_tar
from unifilter_core import paths
from unifilter_core.catalog import TarRecord
from unifilter_core.partition_groups import partition_keys, partition_of, resolve_tars
from unifilter_core.partition_steps import TarSource
from unifilter_core.scoring.discovery import find_shards


def test_group_keys_round_trip() -> None:
    assert paths.group_key("datacomp", 0, 255) == "datacomp_0000-0255"
    assert paths.group_key("datacomp", 12800, 13055) == "datacomp_12800-13055"
    assert paths.group_of(300, 256) == (256, 511)
    assert paths.group_of(7, 1) == (7, 7)
    assert paths.parse_partition("datacomp_0000-0255") == ("datacomp", 0, 255)
    assert paths.parse_partition("obelics_0042") == ("obelics", 42, 42)
    assert paths.parse_partition("my_src_0001-0002") == ("my_src", 1, 2)
    for bad in ("datacomp_0255-0000", "datacomp_00-", "datacomp_-1", "datacomp", "datacomp_²"):
        with pytest.raises(ValueError, match="partition key"):
            paths.parse_partition(bad)
    with pytest.raises(ValueError, match="group_size"):
        paths.group_of(3, 0)


def test_a_source_names_its_partitions_by_group_size() -> None:
    assert TarSource("obelics", "interleaved").partition_of(42) == "obelics_0042"
    assert TarSource("datacomp", "caption", group_size=256).partition_of(42) == "datacomp_0000-0255"
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
            TarSource("datacomp", "caption", group_size=bad)  # type: ignore[arg-type]
    specs = [TarSource("dc", "caption", group_size=4), TarSource("ob", "interleaved")]
    records = [TarRecord(f"dc_{i:04d}", "dc", f"/x/{i}.tar") for i in (0, 3, 4, 9)]
    records += [TarRecord("ob_0007", "ob", "/y/7.tar"), TarRecord("gone_0001", "gone", "/z/1.tar")]
    assert partition_keys(records, specs) == ["dc_0000-0003", "dc_0004-0007", "dc_0008-0011", "ob_0007"]
    assert partition_of("gone_0001", specs) is None


def test_resolve_a_group_finds_its_tars_and_refuses_foreign_ranges(tmp_path: Path) -> None:
    folder = tmp_path / "sources" / "dc"
    for i in (0, 2, 3, 5):
        write_caption_tar(folder / f"{i:08d}.tar", n=1)
    specs = [TarSource("dc", "caption", group_size=4)]
    part = resolve_tars(tmp_path, specs, "dc_0000-0003")
    assert [k for k, _ in part.tars] == ["dc_0000", "dc_0002", "dc_0003"] and part.grouped
    assert [t.name for _, t in part.tars] == ["00000000.tar", "00000002.tar", "00000003.tar"]
    single = resolve_tars(tmp_path, specs, "dc_0005")  # one tar of a grouped source, alone
    assert [k for k, _ in single.tars] == ["dc_0005"] and not single.grouped
    with pytest.raises(ValueError, match="group_size 4, so its partitions are 'dc_0000-0003'"):
        resolve_tars(tmp_path, specs, "dc_0000-0007")
    with pytest.raises(ValueError, match="group_size 1"):
        resolve_tars(tmp_path, [TarSource("dc", "caption")], "dc_0000-0003")
    with pytest.raises(ValueError, match=r"no tar numbered 8\.\.11 under"):
        resolve_tars(tmp_path, specs, "dc_0008-0011")
    with pytest.raises(ValueError, match="source 'xx' is not configured"):
        resolve_tars(tmp_path, specs, "xx_0000-0003")


def test_find_shards_lists_the_folder_only_when_no_canonical_name_exists(tmp_path: Path) -> None:
    canon = tmp_path / "canon"
    for i in (4, 6):
        write_caption_tar(canon / f"{i:08d}.tar", n=1)
    assert sorted(find_shards(canon, 4, 7)) == [4, 6]
    other = tmp_path / "other"
    for name in ("shard_4.tar", "6.tar", "9.tar"):
        write_caption_tar(other / name, n=1)
    found = find_shards(other, 4, 7)
    assert {n: p.name for n, p in found.items()} == {4: "shard_4.tar", 6: "6.tar"}
    assert find_shards(tmp_path / "missing", 0, 3) == {}
