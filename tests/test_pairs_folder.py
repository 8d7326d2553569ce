"""Synthetic-pairs folder ownership: world pairs move aside for Claude, Claude pairs are never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.test_claude import make_images
from unifilter_core.synth import WorldConfig
from unifilter_core.synth.pairs_folder import (
    PairsFolderConflict,
    holds_claude_pairs,
    holds_world_pairs,
    move_world_pairs_aside,
)
from unifilter_core.synth.world import write_synthetic_pairs

TINY = WorldConfig(train_images=3, val_images=2, train_documents=2, val_documents=2)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _claude_folder(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / "ledger.jsonl").write_text('{"request_id": "r1", "status": "succeeded"}\n')
    (folder / "results.jsonl").write_text('{"request_id": "r1"}\n')
    (folder / "train.json").write_text("[]")
    return _tree(folder)


def test_world_pairs_move_aside_and_replace_an_older_copy(tmp_path: Path) -> None:
    out = tmp_path / "synthetic" / "caption"
    assert move_world_pairs_aside(out) is None  # nothing there yet
    write_synthetic_pairs("caption", out, TINY)
    first = _tree(out)
    aside = move_world_pairs_aside(out)
    assert aside == tmp_path / "synthetic" / "caption.world"
    assert not out.exists() and _tree(aside) == first and holds_world_pairs(aside)
    write_synthetic_pairs("caption", out, WorldConfig(seed=5, train_images=2, val_images=1))
    second = _tree(out)
    assert move_world_pairs_aside(out) == aside and _tree(aside) == second  # the older copy was replaced


def test_world_generator_never_writes_over_claude_pairs(tmp_path: Path) -> None:
    out = tmp_path / "caption"
    before = _claude_folder(out)
    with pytest.raises(PairsFolderConflict, match="Claude-written pairs"):
        write_synthetic_pairs("caption", out, TINY)
    assert _tree(out) == before and holds_claude_pairs(out)
    assert move_world_pairs_aside(out) is None  # not world pairs: left alone


def test_moving_aside_refuses_to_delete_anything_but_world_pairs(tmp_path: Path) -> None:
    out = tmp_path / "caption"
    write_synthetic_pairs("caption", out, TINY)
    occupied = _claude_folder(tmp_path / "caption.world")  # someone put a Claude run where the copy would go
    world = _tree(out)
    with pytest.raises(PairsFolderConflict, match="not a folder of world pairs"):
        move_world_pairs_aside(out)
    assert _tree(out) == world and _tree(tmp_path / "caption.world") == occupied
    (out / "ledger.jsonl").write_text("")
    with pytest.raises(PairsFolderConflict, match="both"):
        move_world_pairs_aside(out)


def test_cli_claude_run_moves_the_default_folders_world_pairs(
    tmp_path: Path,
    fake: FakeAnthropic,
    capsys,
) -> None:
    from unifilter_core.cli import main
    from unifilter_core.paths import synthetic_dir

    root = tmp_path / "root"
    out = synthetic_dir(root, "caption")
    write_synthetic_pairs("caption", out, TINY)
    world = _tree(out)
    src = make_images(tmp_path / "src", 2)
    argv = [
        "synth",
        "caption",
        "--source",
        "images",
        str(src),
        "--data-root",
        str(root),
        "--mode",
        "messages",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    aside = out.with_name("caption.world")
    assert summary["world_pairs_moved_to"] == str(aside) and _tree(aside) == world
    records = sum(len(json.loads((out / f"{split}.json").read_text())) for split in ("train", "val"))
    assert holds_claude_pairs(out) and records == 2 * 4  # 2 images x 4 levels, all Claude-written
    # the world backend now refuses the folder (paid-for pairs), with a clear CLI error
    assert main(["synth", "caption", "--source", "world", "--data-root", str(root)]) == 2
    assert "Claude-written pairs" in capsys.readouterr().err
