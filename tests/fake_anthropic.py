"""A local fake of the Anthropic Messages and Message Batches HTTP API, for tests with the real SDK.

A real HTTP server on 127.0.0.1 (random port, one thread per connection) implementing:

- ``POST /v1/messages``: answers with a ``tool_use`` block whose input it writes from the request (one text per
  level, with as many ``<image>`` markers as the instruction asks for) and realistic ``usage`` (the system prompt
  and tools are a cache write the first time they are seen, a cache read afterwards);
- ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results``
  (JSON Lines), with batches that end after a scripted number of polls.

Fault injection: :attr:`FakeAnthropic.message_faults` is a queue consumed one entry per ``POST /v1/messages``:
``"429"`` / ``"429:<seconds>"`` (rate limit with ``retry-after``), ``"500"`` / ``"529"`` (overloaded), also with
``:<seconds>`` for a ``retry-after``, ``"reset"`` (the socket is closed with a TCP reset, no response), ``"slow"``
(answers after :attr:`slow_s`, past the client's timeout), ``"malformed"`` (a tool input missing a level),
``"no_tool"`` (text only), ``"400"``. :attr:`FakeAnthropic.batch_create_faults` is the same for
``POST /v1/messages/batches`` (``"429"``, ``"500"``, ``"529"`` with optional ``:<seconds>``): the batch is then
not created; :attr:`FakeAnthropic.batch_get_faults` for the ``GET`` of a batch or its results.
:meth:`FakeAnthropic.plan_batch` scripts the next created batch (polls before it ends, result type, malformed
outputs); :meth:`FakeAnthropic.end_batch` ends one now.

Everything received is kept in :attr:`requests`; every response the API would bill is in :attr:`billed`, with
an ``identity`` (hash of the attached images) so tests can assert that nothing was paid twice. The fake never
writes anything to disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOL_MARKER_RE = re.compile(r"exactly (\d+) <image> markers")
_STATUS_FAULTS = {
    "429": ("rate_limit_error", "Rate limited"),
    "500": ("api_error", "Internal server error"),
    "529": ("overloaded_error", "Overloaded"),
}


@dataclass
class Billed:
    """One response the real API would charge for."""

    identity: str  # hash of the request's images: the same source content gives the same identity
    usage: dict[str, int]
    batch: bool
    custom_id: str | None = None


@dataclass
class FakeBatch:
    id: str
    requests: list[dict[str, Any]]
    polls_left: int
    result_type: str = "succeeded"
    malformed: int = 0
    ended: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass
class Received:
    method: str
    path: str
    body: Any
    outcome: str  # "ok" or the fault applied


class FakeAnthropic:
    """The fake API's state. Start with :meth:`start`; ``base_url`` then points at it."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.message_faults: deque[str] = deque()
        self.batch_create_faults: deque[str] = deque()
        self.batch_get_faults: deque[str] = deque()
        self.slow_s = 1.0
        self.requests: list[Received] = []
        self.billed: list[Billed] = []
        self.batches: dict[str, FakeBatch] = {}
        self.default_batch_polls = 1
        self._batch_plans: deque[dict[str, Any]] = deque()
        self._cached_prefixes: set[str] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            state = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- scripting ---------------------------------------------------------------------------------------------
    def plan_batch(self, *, polls: int = 1, result: str = "succeeded", malformed: int = 0) -> None:
        """Script the next created batch: ``polls`` retrieves before it ends, every result of type ``result``
        (succeeded | expired | errored | canceled), the first ``malformed`` succeeded outputs malformed."""
        self._batch_plans.append({"polls": polls, "result": result, "malformed": malformed})

    def end_batch(self, batch_id: str) -> None:
        with self._lock:
            self.batches[batch_id].polls_left = 0

    # ---- queries -----------------------------------------------------------------------------------------------
    def received(self, method: str, path_prefix: str) -> list[Received]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def batch_creates(self) -> int:
        return sum(1 for r in self.requests if r.method == "POST" and r.path == "/v1/messages/batches")

    def billed_identities(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b in self.billed:
            counts[b.identity] = counts.get(b.identity, 0) + 1
        return counts

    def billed_tokens(self) -> dict[str, int]:
        keys = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        return {k: sum(b.usage[k] for b in self.billed) for k in keys}

    def billed_cost(self, pricing: Any, batch_discount: float = 0.5) -> float:
        """The bill, with a :class:`unifilter_core.synth.ledger.Pricing`."""
        total = 0.0
        for b in self.billed:
            usd = (
                b.usage["input_tokens"] * pricing.input
                + b.usage["output_tokens"] * pricing.output
                + b.usage["cache_creation_input_tokens"] * pricing.cache_write
                + b.usage["cache_read_input_tokens"] * pricing.cache_read
            ) / 1e6
            total += usd * (batch_discount if b.batch else 1.0)
        return total

    # ---- model behaviour ---------------------------------------------------------------------------------------
    def make_message(self, params: dict[str, Any], *, malformed: bool = False, no_tool: bool = False) -> dict:
        """A Message for ``params`` (and its usage), as the API would return it."""
        content = params["messages"][-1]["content"]
        images = [b for b in content if b.get("type") == "image"]
        texts = " ".join(b.get("text", "") for b in content if b.get("type") == "text")
        match = TOOL_MARKER_RE.search(texts)
        n_markers = int(match.group(1)) if match else 0
        tag = identity_of(params)[:8]
        tool_input = {f"level_{lv}": _level_text(lv, tag, n_markers) for lv in (3, 2, 1, 0)}
        if malformed:
            del tool_input["level_0"]
        tool = params["tools"][0]
        prefix = json.dumps([params.get("system"), params.get("tools")], sort_keys=True)
        prefix_tokens = len(prefix) // 4
        with self._lock:
            seen = prefix in self._cached_prefixes
            self._cached_prefixes.add(prefix)
        if no_tool:
            blocks = [{"type": "text", "text": "Here are the captions you asked for."}]
        else:
            blocks = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{next(self._ids):06d}",
                    "name": tool["name"],
                    "input": tool_input,
                }
            ]
        usage = {
            "input_tokens": len(texts) // 4 + 85 * len(images) + 12,
            "output_tokens": len(json.dumps(blocks)) // 4 + 7,
            "cache_creation_input_tokens": 0 if seen else prefix_tokens,
            "cache_read_input_tokens": prefix_tokens if seen else 0,
        }
        return {
            "id": f"msg_{next(self._ids):08d}",
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": blocks,
            "stop_reason": "end_turn" if no_tool else "tool_use",
            "stop_sequence": None,
            "usage": usage,
        }

    def create_batch(self, body: dict[str, Any]) -> FakeBatch:
        plan = self._batch_plans.popleft() if self._batch_plans else {"polls": self.default_batch_polls}
        with self._lock:
            batch = FakeBatch(
                id=f"msgbatch_{next(self._ids):08d}",
                requests=body["requests"],
                polls_left=plan["polls"],
                result_type=plan.get("result", "succeeded"),
                malformed=plan.get("malformed", 0),
            )
            self.batches[batch.id] = batch
        return batch

    def poll_batch(self, batch_id: str) -> FakeBatch:
        batch = self.batches[batch_id]
        with self._lock:
            if not batch.ended:
                if batch.polls_left <= 0:
                    batch.ended = True
                    end_now = True
                else:
                    batch.polls_left -= 1
                    end_now = False
            else:
                end_now = False
        if end_now:
            self._finish(batch)
        return batch

    def _finish(self, batch: FakeBatch) -> None:
        for i, request in enumerate(batch.requests):
            cid, params = request["custom_id"], request["params"]
            if batch.result_type == "succeeded":
                message = self.make_message(params, malformed=i < batch.malformed)
                result: dict[str, Any] = {"type": "succeeded", "message": message}
                self.billed.append(Billed(identity_of(params), message["usage"], True, cid))
            elif batch.result_type == "errored":
                err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
                result = {"type": "errored", "error": err}
            else:
                result = {"type": batch.result_type}
            batch.results.append({"custom_id": cid, "result": result})

    def batch_json(self, batch: FakeBatch) -> dict[str, Any]:
        n = len(batch.requests)
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if batch.ended:
            counts[batch.result_type] = n
        else:
            counts["processing"] = n
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if batch.ended else "in_progress",
            "request_counts": counts,
            "created_at": batch.created_at.isoformat(),
            "expires_at": (batch.created_at + timedelta(hours=24)).isoformat(),
            "ended_at": datetime.now(timezone.utc).isoformat() if batch.ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results" if batch.ended else None,
        }


def identity_of(params: dict[str, Any]) -> str:
    """Hash of the images a request carries (a re-asked request has the same identity)."""
    content = params["messages"][-1]["content"]
    data = [b["source"]["data"] for b in content if b.get("type") == "image"]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def _level_text(level: int, tag: str, n_markers: int) -> str:
    words = {
        3: "A red square and two small blue circles on a grey background, the square at the left.",
        2: "Some shapes on a background.",
        1: "A green triangle and three yellow stars on a white background, the triangle at the top.",
        0: "BUY NOW cheap deals click here free shipping",
    }[level]
    if n_markers == 0:
        return f"{words} ({tag})"
    parts = [f"Intro {tag} level {level}."]
    parts += [f"<image>\n{words} Paragraph {i}." for i in range(n_markers)]
    return "\n\n".join(parts)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # resets and timeouts are expected
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeAnthropic

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _send(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ):
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json" if raw is None else "application/binary")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_{next(self.state._ids):08d}")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, status: int, etype: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"type": "error", "error": {"type": etype, "message": message}}, headers)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _status_fault(self, fault: str) -> bool:
        """Answer a ``429`` / ``500`` / ``529`` fault (``:<seconds>``: a ``retry-after``); False for other faults."""
        kind, _, arg = fault.partition(":")
        if kind not in _STATUS_FAULTS:
            return False
        etype, message = _STATUS_FAULTS[kind]
        retry_after = arg or ("0" if kind == "429" else None)
        self._error(int(kind), etype, message, {"retry-after": retry_after} if retry_after else None)
        return True

    def _authorised(self) -> bool:
        bearer = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        if self.state.api_key not in (self.headers.get("x-api-key"), bearer):
            self._error(401, "authentication_error", "invalid x-api-key")
            return False
        return True

    def _record(self, body: Any, outcome: str) -> None:
        with self.state._lock:
            self.state.requests.append(Received(self.command, self.path, body, outcome))

    # ---- endpoints ---------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = self._body()
        path = self.path.split("?")[0]
        if not self._authorised():
            self._record(body, "401")
            return
        if path == "/v1/messages":
            self._messages(body)
        elif path == "/v1/messages/batches":
            with self.state._lock:
                fault = self.state.batch_create_faults.popleft() if self.state.batch_create_faults else "ok"
            self._record(body, fault)
            if not self._status_fault(fault):
                batch = self.state.create_batch(body)
                self._send(200, self.state.batch_json(batch))
        else:
            self._record(body, "404")
            self._error(404, "not_found_error", f"no route {path}")

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        with self.state._lock:
            fault = self.state.batch_get_faults.popleft() if self.state.batch_get_faults else "ok"
        self._record(None, fault)
        if not self._authorised() or self._status_fault(fault):
            return
        match = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results)?", path)
        if not match or match.group(1) not in self.state.batches:
            self._error(404, "not_found_error", f"no route {path}")
            return
        batch = self.state.batches[match.group(1)]
        if match.group(2):
            if not batch.ended:
                self._error(400, "invalid_request_error", "batch still processing")
                return
            lines = b"".join(json.dumps(r).encode() + b"\n" for r in batch.results)
            self._send(200, None, raw=lines)
        else:
            self._send(200, self.state.batch_json(self.state.poll_batch(batch.id)))

    def _messages(self, params: dict[str, Any]) -> None:
        fake = self.state
        with fake._lock:
            fault = fake.message_faults.popleft() if fake.message_faults else "ok"
        self._record(params, fault)
        kind = fault.partition(":")[0]
        if self._status_fault(fault):
            return
        if kind == "400":
            self._error(400, "invalid_request_error", "Could not process image")
        elif kind == "reset":
            self._reset()
        elif kind == "slow":
            time.sleep(fake.slow_s)  # the client has given up: not billed (see module docstring)
            self._send(200, fake.make_message(params))
        else:
            message = fake.make_message(params, malformed=kind == "malformed", no_tool=kind == "no_tool")
            fake.billed.append(Billed(identity_of(params), message["usage"], False))
            self._send(200, message)
