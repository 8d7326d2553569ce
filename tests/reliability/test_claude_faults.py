"""Claude path faults beyond tests/test_claude.py: storms under concurrency, ambiguous batch creation, budget
accounting after expiry and in batch mode. Real SDK, fake server (tests/fake_anthropic.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.test_claude import assert_ledger_matches_bill, caption_items, fast
from unifilter_core.synth.claude import estimate_cost, run_claude_generation
from unifilter_core.synth.prompts import prepare_image


def _one_estimate(items, **kw) -> float:
    return estimate_cost("caption", [prepare_image(items[0].images[0].read(), 1568)], fast(), **kw)


def test_429_storm_with_retry_after_under_concurrency(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["429:0.2"] * 9)
    config = fast(mode="messages", concurrency=3, max_retries=6)
    out = tmp_path / "out"
    started = time.monotonic()
    summary = run_claude_generation("caption", caption_items(tmp_path, 6), out, config)
    elapsed = time.monotonic() - started
    assert summary["requests_by_status"] == {"succeeded": 6}
    outcomes = [r.outcome for r in fake.received("POST", "/v1/messages")]
    assert outcomes.count("429:0.2") == 9 and outcomes.count("ok") == 6
    assert elapsed >= 9 * 0.2 / 3 - 0.05, "retry-after (0.2 s) must be waited out, not the 1 ms backoff"
    assert set(fake.billed_identities().values()) == {1}
    assert_ledger_matches_bill(out, fake, config)


def test_429_storm_longer_than_retries_then_rerun(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["429:0"] * 6)
    config = fast(mode="messages", concurrency=2, max_retries=1)
    out = tmp_path / "out"
    items = caption_items(tmp_path, 4)
    first = run_claude_generation("caption", items, out, config)
    assert first["requests_by_status"].get("failed", 0) >= 2  # the storm outlasted the retries of some
    assert fake.billed == [] or set(fake.billed_identities().values()) == {1}
    second = run_claude_generation("caption", items, out, config)
    assert second["requests_by_status"] == {"succeeded": 4}
    assert sorted(fake.billed_identities().values()) == [1, 1, 1, 1]
    assert_ledger_matches_bill(out, fake, config)


def test_resets_timeouts_and_5xx_under_concurrency(tmp_path: Path, fake: FakeAnthropic) -> None:
    fake.message_faults.extend(["reset", "slow", "reset", "500", "slow", "529", "reset"])
    fake.slow_s = 0.8
    config = fast(mode="messages", concurrency=3, timeout_s=0.3, max_retries=6)
    out = tmp_path / "out"
    summary = run_claude_generation("caption", caption_items(tmp_path, 5), out, config)
    assert summary["requests_by_status"] == {"succeeded": 5}
    assert sorted(fake.billed_identities().values()) == [1] * 5
    assert_ledger_matches_bill(out, fake, config)


class ResetOnBatchCreate(FakeAnthropic):
    """Creates the batch, then drops the connection before answering (the client cannot know it exists)."""

    resets_left = 1

    def create_batch(self, body):
        batch = super().create_batch(body)
        if self.resets_left > 0:
            self.resets_left -= 1
            raise ConnectionResetError("dropped after creating the batch")
        return batch


@pytest.fixture
def flaky_batches(api_key: str, monkeypatch: pytest.MonkeyPatch):
    server = ResetOnBatchCreate(api_key)
    monkeypatch.setenv("ANTHROPIC_API_KEY", api_key)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.start())
    yield server
    server.stop()


def test_batch_create_reset_is_never_retried_blindly(
    tmp_path: Path, flaky_batches: ResetOnBatchCreate
) -> None:
    """A connection lost during batch creation is ambiguous: no retry in the run, bounded resends after."""
    fake = flaky_batches
    fake.resets_left = 2
    items = caption_items(tmp_path, 3)
    config = fast(mode="batches", max_retries=5)
    out = tmp_path / "out"
    first = run_claude_generation("caption", items, out, config)
    assert first["requests_by_status"] == {"failed": 3}
    assert fake.batch_creates() == 1, "a retry of an ambiguous create could pay twice"
    second = run_claude_generation("caption", items, out, config)
    assert second["requests_by_status"] == {"failed": 3} and fake.batch_creates() == 2
    third = run_claude_generation("caption", items, out, config)  # max_submissions (2) reached: final
    assert third["requests_by_status"] == {"failed": 3} and fake.batch_creates() == 2
    assert fake.billed == []


def test_budget_after_an_expired_batch_is_released(tmp_path: Path, fake: FakeAnthropic) -> None:
    """An expired batch costs nothing: its reserved estimate must not block the next run's budget."""
    items = caption_items(tmp_path, 4)
    budget = 2.5 * _one_estimate(items)  # room for two messages-mode requests, four batch ones
    out = tmp_path / "out"
    fake.plan_batch(polls=2, result="expired")
    first = run_claude_generation("caption", items, out, fast(mode="batches", budget_usd=budget))
    assert first["requests_by_status"] == {"expired": 4} and first["cost_usd"] == 0
    second = run_claude_generation(
        "caption", items, out, fast(mode="messages", budget_usd=budget, concurrency=1)
    )
    done = second["requests_by_status"]
    assert done.get("succeeded", 0) >= 2 and done.get("succeeded", 0) + done.get("budget_stopped", 0) == 4
    assert fake.billed_cost(fast().pricing) <= budget
    assert set(fake.billed_identities().values()) == {1}


def test_budget_cap_in_batch_mode(tmp_path: Path, fake: FakeAnthropic) -> None:
    items = caption_items(tmp_path, 6)
    budget = 2.5 * _one_estimate(items, discount=0.5)
    config = fast(mode="batches", budget_usd=budget)
    out = tmp_path / "out"
    summary = run_claude_generation("caption", items, out, config)
    assert summary["requests_by_status"] == {"succeeded": 2, "budget_stopped": 4}
    sent = fake.received("POST", "/v1/messages/batches")[0].body["requests"]
    assert len(sent) == 2, "requests over the cap are never put in a batch"
    assert fake.billed_cost(config.pricing, config.batch_discount) <= budget
    assert_ledger_matches_bill(out, fake, config)
