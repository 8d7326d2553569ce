"""Security: writer confinement, SQL parameters, the API key never written, safetensors-only checkpoints."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.reliability.conftest import files_under
from tests.tarfixtures import caption_members, jpeg_bytes
from unifilter_core.catalog import Catalog, TarRecord

# --------------------------------------------------------------------------------------------- writer confinement


def _hostile_link_tar(path: Path, outside: Path) -> list[str]:
    """A tar with traversal names, absolute names, symlinks, hard links, devices and a FIFO; returns its keys."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def reg(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        entries.append((info, data))

    def special(name: str, kind: bytes, target: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        entries.append((info, None))

    for name, data in caption_members("good"):
        reg(name, data)
    reg("../../escape.jpg", jpeg_bytes())
    reg("../../escape.txt", b"traversal")
    reg(str(outside / "abs.txt"), b"absolute")
    reg("a/b/../../../up.txt", b"nested traversal")
    special("link.jpg", tarfile.SYMTYPE, str(outside / "target"))
    reg("link.txt", b"caption of a symlinked image")
    special("evil", tarfile.SYMTYPE, str(outside))
    reg("evil/through.jpg", jpeg_bytes())  # a member written "through" the symlink above
    reg("evil/through.txt", b"through a symlink")
    special("hard.jpg", tarfile.LNKTYPE, "../../etc/passwd")
    reg("hard.txt", b"caption of a hard link")
    special("dev.jpg", tarfile.CHRTYPE)
    special("blk.jpg", tarfile.BLKTYPE)
    special("fifo.jpg", tarfile.FIFOTYPE)
    special("dir.d", tarfile.DIRTYPE)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return ["good", "../../escape", str(outside / "abs"), "a/b/../../../up", "link", "evil", "evil/through",
            "hard", "dev", "blk", "fifo", "dir"]  # fmt: skip


def _assert_safe_tar(path: Path, extract_to: Path) -> list[str]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for m in members:
            assert m.isreg(), f"{m.name}: only regular files may be written"
            assert not m.name.startswith("/") and ".." not in Path(m.name).parts, m.name
            assert m.mode & 0o7000 == 0, f"{m.name}: setuid/setgid bits"
        tar.extractall(extract_to, filter="data")  # stdlib's strict filter raises on anything unsafe
    return sorted(m.name for m in members)


def test_filtered_writer_never_writes_outside_its_folder(tmp_path: Path) -> None:
    from unifilter_core.data import write_filtered_tar

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("do not touch")
    src_dir = tmp_path / "work" / "sources" / "s"
    src_dir.mkdir(parents=True)
    keys = _hostile_link_tar(src_dir / "00000001.tar", outside)
    before = files_under(tmp_path)
    out = tmp_path / "work" / "filtered" / "s" / "00000001.tar"
    summary = write_filtered_tar(src_dir / "00000001.tar", set(keys), out)
    after = files_under(tmp_path)
    assert set(after) - set(before) == {str(out.relative_to(tmp_path))}, "exactly one new file: the output"
    assert {k: after[k] for k in before} == before, "no existing file changed size"
    assert (outside / "target").read_text() == "do not touch"
    assert summary.unsafe >= 4 and summary.members_written >= 3
    names = _assert_safe_tar(out, tmp_path / "extract")
    assert "good.jpg" in names and not any("escape" in n or "abs" in n or "up.txt" in n for n in names)
    assert not any(
        n.split(".")[0] in ("link", "hard", "dev", "blk", "fifo") and n.endswith(".jpg") for n in names
    )
    system_tar = shutil.which("tar")
    if system_tar:  # GNU tar reads it and extracts nothing outside the target folder
        target = tmp_path / "gnu"
        target.mkdir()
        subprocess.run([system_tar, "-xf", str(out), "-C", str(target)], check=True)
    assert files_under(outside) == {"target": len("do not touch")}


def test_filtered_dataset_asset_step_confined_with_everything_kept(tmp_path: Path) -> None:
    """The pipeline step of ``filtered_dataset`` with a score table that keeps every key, hostile ones too."""
    from unifilter_core.partition_steps import TarSource, filter_partition

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    tar = root / "sources" / "s" / "00000001.tar"
    tar.parent.mkdir(parents=True)
    keys = _hostile_link_tar(tar, outside)
    table = root / "scores" / "s" / "00000001.parquet"
    table.parent.mkdir(parents=True)
    n = len(keys)
    pq.write_table(
        pa.table(
            {"key": keys, "uid": [None] * n, "score": pa.array([2.0] * n, pa.float32()), "status": ["ok"] * n}
        ),
        table,
    )
    (root / "thresholds.json").write_text(json.dumps({"s": {"threshold": 0.0}}))
    before = files_under(tmp_path)
    result = filter_partition(root, TarSource("s", "caption"), tar, "s_0001")
    new = set(files_under(tmp_path)) - set(before)
    assert new == {"root/filtered/s/00000001.tar", "root/filtered/s/00000001.manifest.json"}
    assert result["unsafe"] >= 4
    _assert_safe_tar(root / "filtered" / "s" / "00000001.tar", tmp_path / "extract")


# --------------------------------------------------------------------------------------------- SQL parameters
HOSTILE = "x'; DROP TABLE tars; --"
HOSTILE2 = 'y"); DELETE FROM score_stats; --'


def _score_table(root: Path, folder: str, num: int, source: str) -> Path:
    path = root / "scores" / folder / f"{num:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "key": ["a", "b", "c"],
                "source": [source] * 3,
                "partition_key": [f"{folder}_{num:04d}"] * 3,
                "uid": pa.array([None] * 3, pa.string()),
                "url": pa.array([None] * 3, pa.string()),
                "score": pa.array([0.5, 1.5, 2.5], pa.float32()),
                "status": ["ok"] * 3,
                "reason": pa.array([None] * 3, pa.string()),
                "n_images": pa.array([1] * 3, pa.int32()),
                "n_tokens": pa.array([9] * 3, pa.int32()),
                "truncated": [False] * 3,
                "model_fingerprint": ["m"] * 3,
                "detail": pa.array([None] * 3, pa.string()),
            }
        ),
        path,
    )
    return path


def _tables(db: Path) -> dict[str, int]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    finally:
        conn.close()


@pytest.mark.parametrize("root_name", ["root", "it's a root"])
def test_hostile_source_names_are_parameters(tmp_path: Path, root_name: str, capsys) -> None:
    root = tmp_path / root_name
    cat = Catalog(root=root)
    cat.register_tars([TarRecord("ok_0001", "ok", "/d/1.tar"), TarRecord(HOSTILE + "_0002", HOSTILE, "/d/2.tar"),
                       TarRecord(HOSTILE2, HOSTILE2, "/d/3.tar")])  # fmt: skip
    cat.record_score_stats("ok_0001", _score_table(root, "ok", 1, "ok"))
    cat.record_score_stats(HOSTILE + "_0002", _score_table(root, "evil", 2, HOSTILE))
    cat.record_lineage(HOSTILE, HOSTILE2, HOSTILE, status=HOSTILE)
    before = _tables(cat.path)
    assert before["tars"] == 3 and before["score_stats"] == 2 and before["lineage"] == 1

    rows = cat.compute_threshold(source=HOSTILE, keep_fraction=0.5)
    assert [(r.source, r.total, r.kept) for r in rows] == [(HOSTILE, 3, 2)]
    assert cat.compute_threshold(source=HOSTILE2) == []
    assert [t.source for t in cat.tars(HOSTILE)] == [HOSTILE]
    assert cat.missing_partitions(HOSTILE2) == [HOSTILE2] and cat.stale_partitions("m", HOSTILE) == []
    assert cat.query("SELECT count(*) FROM scores WHERE source = ?", [HOSTILE])[1] == [(3,)]
    from unifilter_core.cli import main

    for source, code in ((HOSTILE, 0), (HOSTILE2, 2)):
        assert main(["thresholds", "--root", str(root), "--source", source, "--json", "--record"]) == code
    out = capsys.readouterr()
    assert json.loads(out.out)[0]["source"] == HOSTILE and "no scored samples" in out.err
    after = _tables(cat.path)
    assert {k: v for k, v in after.items() if k != "thresholds"} == {
        k: v for k, v in before.items() if k != "thresholds"
    }
    assert after["thresholds"] == before["thresholds"] + 2  # compute_threshold + the CLI's --record
    cat.delete_partition(HOSTILE2)
    assert _tables(cat.path)["tars"] == 2


def test_cli_refuses_non_numeric_thresholds(tmp_path: Path, capsys) -> None:
    from unifilter_core.cli import main

    root = tmp_path / "root"
    Catalog(root=root)
    for flag in ("--keep", "--absolute"):
        with pytest.raises(SystemExit) as info:
            main(["thresholds", "--root", str(root), flag, "0.3); DROP TABLE tars; --"])
        assert info.value.code == 2 and "invalid float value" in capsys.readouterr().err
    assert _tables(root / "unifilter.duckdb")["tars"] == 0


# --------------------------------------------------------------------------------------------- the API key


def test_api_key_never_lands_on_disk_or_in_dagster_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from tests.fake_anthropic import FakeAnthropic
    from tests.test_claude import make_images
    from unifilter_dagster.assets.generation import synthetic_caption_pairs
    from unifilter_dagster.resources import ClaudeResource, UniFilterHome

    sentinel = "sk-ant-api03-SENTINEL-" + os.urandom(12).hex()
    fake = FakeAnthropic(sentinel)
    url = fake.start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", sentinel)
        monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
        fake.message_faults.extend(["429", "reset", "400", "malformed"])
        root = tmp_path / "root"
        images = make_images(tmp_path / "images", 4)
        dagster_home = tmp_path / "dagster_home"
        dagster_home.mkdir()
        monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
        claude = ClaudeResource(
            backend="claude", base_url=url, mode="messages", source_type="images", source_path=str(images),
            concurrency=1, budget_usd=10.0,
        )  # fmt: skip
        resources = {
            "home": UniFilterHome(root=str(root), use_world=False),
            "claude": claude,
            "duckdb": DuckDBResource(database=str(root / "unifilter.duckdb")),
        }
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            ok = dg.materialize([synthetic_caption_pairs], resources=resources, instance=instance)
            assert ok.success
            monkeypatch.setenv("ANTHROPIC_API_KEY", sentinel + "-wrong")  # a failing run logs its error too
            bad = dg.materialize(
                [synthetic_caption_pairs], resources=resources, instance=instance, raise_on_error=False
            )
            assert not bad.success
            events = [e for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
        assert any(r.method == "POST" for r in fake.requests)
    finally:
        fake.stop()
    assert len(events) > 20
    for event in events:
        assert sentinel not in repr(event)
    scanned = 0
    for folder in (root, dagster_home, tmp_path):
        for path in folder.rglob("*"):
            if path.is_file():
                assert sentinel.encode() not in path.read_bytes(), path
                scanned += 1
    assert scanned > 10


# --------------------------------------------------------------------------------------------- safetensors only
class _Bomb:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_checkpoint(src: Path, dest: Path, name: str, marker: Path, keep_safetensors: bool) -> Path:
    shutil.copytree(src, dest)
    if not keep_safetensors:
        (dest / "model.safetensors").unlink()
    (dest / name).write_bytes(pickle.dumps(_Bomb(marker)))
    return dest


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt"])
def test_pickle_only_checkpoint_is_refused_with_the_reason(tmp_path: Path, rel_ckpt: Path, name: str) -> None:
    from unifilter_core.scorer import load_scorer

    marker = tmp_path / "executed"
    ckpt = _pickle_checkpoint(rel_ckpt, tmp_path / "ckpt", name, marker, keep_safetensors=False)
    with pytest.raises(ValueError, match=r"pickle") as info:
        load_scorer(ckpt)
    assert name in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


def test_cli_score_refuses_a_pickle_checkpoint(tmp_path: Path, rel_ckpt: Path, capsys) -> None:
    from tests.tarfixtures import write_caption_tar
    from unifilter_core.cli import main

    marker = tmp_path / "executed"
    ckpt = _pickle_checkpoint(
        rel_ckpt, tmp_path / "ckpt", "pytorch_model.bin", marker, keep_safetensors=False
    )
    write_caption_tar(tmp_path / "tars" / "00000000.tar", n=2)
    out = tmp_path / "out"
    argv = ["score", "caption", "--model-path", str(ckpt), "--tar-file-path", str(tmp_path / "tars"),
            "--output-dir", str(out), "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not out.exists()


def test_pickle_next_to_safetensors_is_never_opened(
    tmp_path: Path, rel_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from unifilter_core.scorer import load_scorer

    marker = tmp_path / "executed"
    ckpt = _pickle_checkpoint(rel_ckpt, tmp_path / "ckpt", "pytorch_model.bin", marker, keep_safetensors=True)
    (ckpt / "training_args.bin").write_bytes(pickle.dumps(_Bomb(marker)))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    real_open = open

    def guarded_open(file, *args, **kwargs):
        assert not str(file).endswith((".bin", ".pt", ".pkl")), f"opened {file}"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    scorer = load_scorer(ckpt)
    assert scorer.model_fingerprint  # loaded from model.safetensors
    assert not marker.exists()
