"""Claude generation with the real ``anthropic`` SDK against a local fake API (tests/fake_anthropic.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from tests.fake_anthropic import FakeAnthropic
from unifilter_core.synth import prompts
from unifilter_core.synth.claude import (
    ClaudeConfig,
    ClaudeRunError,
    MissingAPIKeyError,
    SourceSpec,
    estimate_cost,
    load_items,
    run_claude_generation,
)
from unifilter_core.synth.ledger import Ledger, LedgerEvent

REPO = Path(__file__).resolve().parents[1]


def fast(**kw) -> ClaudeConfig:
    base = {"poll_interval_s": 0.02, "timeout_s": 5.0, "concurrency": 2}
    return ClaudeConfig(**{**base, **kw})


def make_images(folder: Path, n: int, size: tuple[int, int] = (24, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (17 * i % 256, 80, 255 - 9 * i % 256)).save(folder / f"img{i:03d}.png")
    return folder


def caption_items(tmp_path: Path, n: int):
    items, _ = load_items("caption", SourceSpec("images", make_images(tmp_path / "src", n)))
    return items


def ledger_of(out: Path) -> Ledger:
    return Ledger(out / "ledger.jsonl")


def assert_ledger_matches_bill(out: Path, fake: FakeAnthropic, config: ClaudeConfig) -> None:
    totals = ledger_of(out).totals()
    billed = fake.billed_tokens()
    assert totals.input_tokens == billed["input_tokens"]
    assert totals.output_tokens == billed["output_tokens"]
    assert totals.cache_creation_input_tokens == billed["cache_creation_input_tokens"]
    assert totals.cache_read_input_tokens == billed["cache_read_input_tokens"]
    assert totals.cost_usd == pytest.approx(fake.billed_cost(config.pricing, config.batch_discount), rel=1e-9)


# ---- prompts and validation ----------------------------------------------------------------------------------------
def test_validation_rules() -> None:
    ok = {f"level_{lv}": f"text {lv}" for lv in prompts.LEVELS}
    assert isinstance(prompts.validate_tool_input("caption", 1, ok), prompts.ValidatedTexts)
    assert "level_0" in prompts.validate_tool_input("caption", 1, {**ok, "level_0": "  "})
    assert "markers" in prompts.validate_tool_input("caption", 1, {**ok, "level_2": "a <image> b"})
    doc = {f"level_{lv}": f"<image> p{lv} <image>" for lv in prompts.LEVELS}
    assert isinstance(prompts.validate_tool_input("interleaved", 2, doc), prompts.ValidatedTexts)
    assert "expected 3" in prompts.validate_tool_input("interleaved", 3, doc)
    assert "different" in prompts.validate_tool_input("caption", 1, dict.fromkeys(ok, "same"))


# ---- Messages API --------------------------------------------------------------------------------------------------
def test_messages_end_to_end_and_rerun_sends_nothing(tmp_path: Path, fake: FakeAnthropic) -> None:
    config = fast(mode="messages")
    items = caption_items(tmp_path, 5)
    out = tmp_path / "out"
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 5}

    sent = fake.received("POST", "/v1/messages")
    assert len(sent) == 5
    body = sent[0].body
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["tool_choice"] == {"type": "tool", "name": prompts.TOOL_NAME}
    assert body["messages"][0]["content"][0]["source"]["media_type"] == "image/png"
    assert sum(b.usage["cache_read_input_tokens"] > 0 for b in fake.billed) >= 3  # the prefix is cached

    records = json.loads((out / "train.json").read_text()) + json.loads((out / "val.json").read_text())
    assert len(records) == 20
    assert sorted(r["label"] for r in records) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert all(r["text"].startswith("<image>\n") and (out / "images" / r["image"]).is_file() for r in records)
    assert_ledger_matches_bill(out, fake, config)

    again = run_claude_generation("caption", items, out, config)
    assert len(fake.requests) == 5  # nothing new sent
    assert again["cost_usd"] == summary["cost_usd"]
    rows = duckdb.sql(
        f"select status, count(*) from read_json('{out / 'ledger.jsonl'}') group by 1"
    ).fetchall()
    assert dict(rows) == {"submitted": 5, "succeeded": 5}


def test_faults_are_retried_and_nothing_is_paid_twice(tmp_path: Path, fake: FakeAnthropic) -> None:
    """The SDK retries (ClaudeConfig.max_retries): its backoff (0.5 s, 1 s) after the reset and the timeout,
    the server's retry-after after the 429 / 500 / 529."""
    fake.message_faults.extend(["reset", "slow", "429:0.01", "500:0.01", "529:0.01"])
    fake.slow_s = 1.0
    config = fast(mode="messages", concurrency=1, timeout_s=0.4)
    out = tmp_path / "out"
    summary = run_claude_generation("caption", caption_items(tmp_path, 3), out, config)
    assert summary["requests_by_status"] == {"succeeded": 3}
    outcomes = [r.outcome for r in fake.received("POST", "/v1/messages")]
    assert outcomes.count("ok") == 3 and len(outcomes) == 8
    assert set(fake.billed_identities().values()) == {1}
    assert_ledger_matches_bill(out, fake, config)


def test_retry_after_is_honoured(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["429:0.6"])
    started = time.monotonic()
    summary = run_claude_generation(
        "caption", caption_items(tmp_path, 1), tmp_path / "out", fast(mode="messages")
    )
    assert 0.6 <= time.monotonic() - started < 5
    assert summary["requests_by_status"] == {"succeeded": 1}


def test_retries_exhausted_is_recorded_and_resent_next_run(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["529"] * 3)
    config = fast(mode="messages", concurrency=1, max_retries=2)
    out = tmp_path / "out"
    items = caption_items(tmp_path, 1)
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"failed": 1}
    assert ledger_of(out).events()[-1].error_type == "overloaded_error"
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 1}


def test_batch_create_is_sent_once_and_resent_next_run(tmp_path: Path, fake: FakeAnthropic) -> None:
    """A failed batch creation is never retried by the SDK (a second batch could pay twice); polls are."""
    fake.batch_create_faults.append("529:0.01")
    config = fast(mode="batches", max_retries=5)
    out = tmp_path / "out"
    items = caption_items(tmp_path, 2)
    first = run_claude_generation("caption", items, out, config)
    assert first["requests_by_status"] == {"failed": 2} and fake.batch_creates() == 1
    assert {(e.error_type, e.attempts) for e in ledger_of(out).state().values()} == {("overloaded_error", 0)}
    fake.batch_get_faults.extend(["500:0.01", "529:0.01"])  # a poll, then its retry
    second = run_claude_generation("caption", items, out, config)
    assert second["requests_by_status"] == {"succeeded": 2} and fake.batch_creates() == 2
    assert [r.outcome for r in fake.received("GET", "/v1/messages/batches")][:3] == [
        "500:0.01",
        "529:0.01",
        "ok",
    ]
    assert set(fake.billed_identities().values()) == {1}


def test_malformed_output_is_reasked_once_then_failed(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["malformed", "ok", "no_tool", "malformed"])
    config = fast(mode="messages", concurrency=1)
    out = tmp_path / "out"
    items = caption_items(tmp_path, 2)
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 1, "failed": 1}
    statuses = [e.status for e in ledger_of(out).events()]
    assert statuses == [
        "submitted",
        "invalid",
        "submitted",
        "succeeded",
        "submitted",
        "invalid",
        "submitted",
        "failed",
    ]
    reask = fake.received("POST", "/v1/messages")[1].body["messages"][0]["content"][-1]["text"]
    assert "rejected" in reask and "level_0" in reask
    assert sorted(fake.billed_identities().values()) == [2, 2]  # invalid answers are paid, and counted
    assert_ledger_matches_bill(out, fake, config)
    run_claude_generation("caption", items, out, config)  # a failed-twice request is final: nothing sent
    assert len(fake.requests) == 4


def test_undecodable_image_is_recorded_not_sent(tmp_path: Path, fake: FakeAnthropic) -> None:
    src = make_images(tmp_path / "src", 2)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items, _ = load_items("caption", SourceSpec("images", src))
    summary = run_claude_generation("caption", items, tmp_path / "out", fast(mode="messages"))
    assert summary["requests_by_status"] == {"succeeded": 2, "failed": 1}
    assert len(fake.requests) == 2
    failed = [e for e in ledger_of(tmp_path / "out").events() if e.status == "failed"]
    assert failed[0].error_type == "image_decode_error"


def test_budget_cap_is_honoured(tmp_path: Path, fake: FakeAnthropic) -> None:
    items = caption_items(tmp_path, 6)
    probe = fast()
    from unifilter_core.synth.prompts import prepare_image

    one = estimate_cost("caption", [prepare_image(items[0].images[0].read(), 1568)], probe)
    budget = 1.2 * one  # the estimate assumes a full max_tokens of output: a few real answers fit
    config = fast(mode="messages", concurrency=1, budget_usd=budget)
    out = tmp_path / "out"
    summary = run_claude_generation("caption", items, out, config)
    assert summary["cost_usd"] <= budget
    assert fake.billed_cost(config.pricing) <= budget
    stopped = summary["requests_by_status"].get("budget_stopped", 0)
    succeeded = summary["requests_by_status"].get("succeeded", 0)
    assert stopped >= 1 and succeeded >= 1 and succeeded + stopped == 6
    bigger = run_claude_generation("caption", items, out, fast(mode="messages", budget_usd=100.0))
    assert bigger["requests_by_status"] == {"succeeded": 6}
    assert set(fake.billed_identities().values()) == {1}


def test_missing_key_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="ANTHROPIC_API_KEY"):
        run_claude_generation("caption", caption_items(tmp_path, 1), tmp_path / "out", fast())
    from unifilter_core.cli import main

    code = main(
        ["synth", "caption", "--source", "images", str(tmp_path / "src"), "--out", str(tmp_path / "o")]
    )
    assert code == 2


def test_wrong_key_stops_the_run_without_final_records(
    tmp_path: Path, fake: FakeAnthropic, monkeypatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    items = caption_items(tmp_path, 3)
    with pytest.raises(ClaudeRunError, match="authentication_error"):
        run_claude_generation("caption", items, tmp_path / "out", fast(mode="messages", concurrency=1))
    assert {e.status for e in ledger_of(tmp_path / "out").events()} <= {"submitted"}
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake.api_key)
    summary = run_claude_generation("caption", items, tmp_path / "out", fast(mode="messages"))
    assert summary["requests_by_status"] == {"succeeded": 3}


# ---- Message Batches API -------------------------------------------------------------------------------------------
def test_batches_end_to_end_documents(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.plan_batch(polls=2, malformed=1)
    items, _ = load_items(
        "interleaved", SourceSpec("images", make_images(tmp_path / "src", 6)), images_per_document=2
    )
    config = fast(mode="batches")
    out = tmp_path / "out"
    summary = run_claude_generation("interleaved", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 3}
    assert fake.batch_creates() == 2  # the batch, then one re-ask of the malformed output
    created = fake.received("POST", "/v1/messages/batches")[0].body["requests"]
    assert len(created) == 3 and all(len(r["custom_id"]) <= 64 for r in created)
    records = json.loads((out / "train.json").read_text()) + json.loads((out / "val.json").read_text())
    assert len(records) == 12
    assert all(r["text"].count("<image>") == len(r["image"]) == 2 for r in records)
    assert all(b.batch for b in fake.billed)
    assert_ledger_matches_bill(out, fake, config)
    events = ledger_of(out).events()
    assert all(e.batch_id for e in events if e.status == "submitted")


def test_expired_batch_is_resubmitted_once_on_the_next_run(tmp_path: Path, fake: FakeAnthropic) -> None:
    items = caption_items(tmp_path, 2)
    config = fast(mode="batches")
    out = tmp_path / "out"
    fake.plan_batch(result="expired")
    assert run_claude_generation("caption", items, out, config)["requests_by_status"] == {"expired": 2}
    assert fake.billed == []
    fake.plan_batch(result="expired")
    assert run_claude_generation("caption", items, out, config)["requests_by_status"] == {"expired": 2}
    run_claude_generation("caption", items, out, config)  # two sends used up: not sent a third time
    assert fake.batch_creates() == 2
    fresh = tmp_path / "fresh"
    fake.plan_batch(result="errored")
    assert run_claude_generation("caption", items, fresh, config)["requests_by_status"] == {"failed": 2}
    assert run_claude_generation("caption", items, fresh, config)["requests_by_status"] == {"succeeded": 2}
    assert set(fake.billed_identities().values()) == {1}


class Killed(Exception):
    pass


def test_interrupted_batch_is_resumed_not_recreated(tmp_path: Path, fake: FakeAnthropic) -> None:
    items = caption_items(tmp_path, 3)
    config = fast(mode="batches")
    out = tmp_path / "out"
    fake.plan_batch(polls=100)

    def kill(pending: list[str], polls: int) -> None:
        raise Killed(pending)

    with pytest.raises(Killed):
        run_claude_generation("caption", items, out, config, poll_hook=kill)
    (batch_id,) = fake.batches
    assert {e.batch_id for e in ledger_of(out).events()} == {batch_id}
    fake.end_batch(batch_id)
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 3}
    assert fake.batch_creates() == 1
    assert set(fake.billed_identities().values()) == {1}
    assert_ledger_matches_bill(out, fake, config)


_CHILD = """
import sys
from pathlib import Path
from unifilter_core.synth.claude import ClaudeConfig, SourceSpec, load_items, run_claude_generation
items, _ = load_items("caption", SourceSpec("images", Path(sys.argv[1])))
run_claude_generation("caption", items, sys.argv[2], ClaudeConfig(mode="batches", poll_interval_s=0.02))
"""


def assert_secret_absent(folder: Path, secret: str) -> int:
    """Scan every byte of every file under ``folder``; returns how many files were scanned."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    return len(files)


def test_killed_process_batch_is_resumed(tmp_path: Path, fake: FakeAnthropic, api_key: str) -> None:
    src = make_images(tmp_path / "src", 4)
    out = tmp_path / "out"
    fake.plan_batch(polls=10**6)
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not any(b.polls_left < 10**6 - 3 for b in fake.batches.values()):  # created, recorded, polled
        assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "child.log").read_text()
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    log.close()
    (batch_id,) = fake.batches
    assert ledger_of(out).state() and all(e.batch_id == batch_id for e in ledger_of(out).state().values())
    fake.end_batch(batch_id)
    items, _ = load_items("caption", SourceSpec("images", src))
    summary = run_claude_generation("caption", items, out, fast(mode="batches"))
    assert summary["requests_by_status"] == {"succeeded": 4}
    assert fake.batch_creates() == 1
    assert set(fake.billed_identities().values()) == {1}
    assert assert_secret_absent(tmp_path, api_key) > 4  # the child's log and files included


# ---- ledger ----------------------------------------------------------------------------------------------------------
def test_ledger_ignores_and_repairs_a_torn_last_line(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(LedgerEvent("r1", "caption", "m", "messages", "submitted", attempts=1))
    with open(ledger.path, "ab") as fh:
        fh.write(b'{"request_id": "r1", "status": "succ')
    assert [e.status for e in ledger.events()] == ["submitted"]
    ledger.append(LedgerEvent("r1", "caption", "m", "messages", "succeeded", attempts=1, cost_usd=0.5))
    assert ledger.state()["r1"].status == "succeeded"
    assert ledger.totals().cost_usd == 0.5
    with pytest.raises(ValueError):
        LedgerEvent("r1", "caption", "m", "messages", "paid")


# ---- secrets -----------------------------------------------------------------------------------------------------------
def test_api_key_is_never_written_or_logged(
    tmp_path: Path, fake: FakeAnthropic, api_key: str, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    caplog.set_level(logging.DEBUG)
    items = caption_items(tmp_path, 3)
    fake.message_faults.extend(["429", "reset", "malformed", "400"])
    run_claude_generation("caption", items, tmp_path / "m", fast(mode="messages", concurrency=1))
    fake.plan_batch(result="errored")
    run_claude_generation("caption", items, tmp_path / "b", fast(mode="batches"))
    from unifilter_core.cli import main

    argv = ["synth", "caption", "--source", "images", str(tmp_path / "src"), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--mode", "messages", "--poll-interval", "0.02"]) == 0
    assert json.loads(capsys.readouterr().out)["requests_by_status"] == {"succeeded": 3}

    assert any(r.method == "POST" for r in fake.requests)  # the key did go over the wire
    assert assert_secret_absent(tmp_path, api_key) > 10
    assert api_key not in caplog.text


# ---- CLI ---------------------------------------------------------------------------------------------------------------
def test_cli_world_source_with_claude_backend(tmp_path: Path, fake: FakeAnthropic, capsys) -> None:
    from unifilter_core.cli import main
    from unifilter_core.paths import pretrain_dir, synthetic_dir

    root = tmp_path / "root"
    pretrain = pretrain_dir(root)
    make_images(pretrain / "images" / "00000", 3)
    records = [{"id": str(i), "image": f"00000/img{i:03d}.png", "conversations": []} for i in range(3)]
    records.append({"id": "bad", "image": "../../etc/passwd", "conversations": []})  # outside: skipped
    (pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    argv = ["synth", "interleaved", "--source", "world", "--backend", "claude", "--data-root", str(root)]
    assert main([*argv, "--mode", "batches", "--poll-interval", "0.01", "--images-per-document", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests_by_status"] == {"succeeded": 2} and summary["out_dir"] == str(
        synthetic_dir(root.resolve(), "interleaved")
    )
    assert fake.batch_creates() == 1
    assert main(["synth", "caption", "--source", "images"]) == 2  # a path is required
    assert main(["synth", "caption", "--source", "images", str(tmp_path), "--backend", "world"]) == 2


def test_cli_world_backend_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    world = pytest.importorskip("unifilter_core.synth.world")
    if not hasattr(world, "write_synthetic_pairs"):
        pytest.skip("world backend not in this build")
    calls = []

    def fake_pairs(kind, out_dir, config):
        calls.append((kind, Path(out_dir), type(config).__name__))
        return {"backend": "world", "kind": kind}

    monkeypatch.setattr(world, "write_synthetic_pairs", fake_pairs)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # the world backend needs no key
    from unifilter_core.cli import main

    assert main(["synth", "caption", "--source", "world", "--out", str(tmp_path / "w")]) == 0
    assert calls == [("caption", tmp_path / "w", "WorldConfig")]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "world_pairs.json").write_text("{}")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-unused")
    src = make_images(tmp_path / "src", 1)
    argv = ["synth", "caption", "--source", "images", str(src), "--out", str(tmp_path / "w")]
    assert main(argv) == 2  # Claude results never mix with world pairs
    assert "world generator" in capsys.readouterr().err


def test_obelics_documents_source(tmp_path: Path, fake: FakeAnthropic) -> None:
    import base64
    import io

    def b64_png(colour: tuple[int, int, int]) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    docs = tmp_path / "obelics"
    docs.mkdir()
    doc = {
        "texts": ["Intro", None, "Middle", None],
        "image_info": [
            None,
            {"image_base64": b64_png((200, 0, 0))},
            None,
            {"image_base64": b64_png((0, 0, 200))},
        ],
    }
    (docs / "a.json").write_text(json.dumps(doc))
    (docs / "b.jsonl").write_text(json.dumps({"texts": ["no images"], "image_info": [None]}) + "\n")
    items, skipped = load_items("interleaved", SourceSpec("obelics", docs))
    assert len(items) == 1 and len(items[0].images) == 2 and skipped == {"no_images": 1}
    summary = run_claude_generation("interleaved", items, tmp_path / "out", fast(mode="messages"))
    assert summary["requests_by_status"] == {"succeeded": 1}
    sent = fake.received("POST", "/v1/messages")[0].body["messages"][0]["content"]
    assert [b["type"] for b in sent] == ["text", "image", "text", "image", "text"]
    captions, _ = load_items("caption", SourceSpec("obelics", docs))
    assert len(captions) == 2


# ---- one dispatch for the CLI and Dagster (synth/generate.py) ------------------------------------------------------
def test_generate_pairs_dispatch_and_typed_errors(tmp_path: Path, fake: FakeAnthropic) -> None:
    from unifilter_core.synth.claude_sources import MissingWorldImagesError
    from unifilter_core.synth.generate import SourceMismatchError, generate_pairs

    src = make_images(tmp_path / "src", 2)
    with pytest.raises(SourceMismatchError):
        generate_pairs("world", "caption", tmp_path / "w", source=SourceSpec("images", src))
    with pytest.raises(ValueError, match="limit"):
        generate_pairs("claude", "caption", tmp_path / "c", source=SourceSpec("images", src), limit=0)
    with pytest.raises(MissingWorldImagesError):
        generate_pairs("claude", "caption", tmp_path / "c", data_root=tmp_path / "empty_root")
    result = generate_pairs(
        "claude",
        "caption",
        tmp_path / "c",
        source=SourceSpec("images", src),
        claude_config=fast(mode="messages"),
    )
    assert result.records == 8 and result.ledger_path == tmp_path / "c" / "ledger.jsonl"
    assert result.summary["skipped_sources"] == result.skipped_sources == {}
    assert result.world_pairs_moved_to is None and "world_pairs_moved_to" not in result.summary
