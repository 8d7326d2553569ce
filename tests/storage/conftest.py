"""An S3 server for the object-storage tests: moto's server mode on 127.0.0.1, reached through the standard
``AWS_*`` environment only (the code under test never gets an endpoint or a key any other way)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

FAKE_KEY_ID = "AKIAUNIFILTERTESTKEY"
FAKE_SECRET = "unifilter-test-secret-never-logged"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server for the session; its URL (``http://127.0.0.1:<port>``)."""
    pytest.importorskip("moto.server", reason="moto[server] is a dev extra (pip install -e '.[dev]')")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The ``AWS_*`` variables pointing at the test server, set in this process (and returned for children)."""
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """A new, empty bucket of its own for one test; its name."""
    import fsspec

    name = f"unifilter-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


def child_env(s3_env: dict[str, str]) -> dict[str, str]:
    """This process's environment with the S3 variables, for a child process."""
    return {**os.environ, **s3_env}
