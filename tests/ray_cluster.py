"""A two-node Ray cluster for one test, inside the test's own network namespace.

Run as ``unshare -n python -m tests.ray_cluster SPEC.json`` (root; :func:`run_in_cluster` does it): brings up the
loopback interface (Ray then binds 127.0.0.1 and reaches nothing else), starts a head and a worker node with
``ray start --block`` (one CPU each, temp dir under the spec's folder), waits until both are alive, runs the
spec's command with ``RAY_ADDRESS`` set, and stops every process it started by PID (never Ray's own stop
command, which would end every Ray process of the machine). The cluster uses Ray's token authentication
(``RAY_AUTH_MODE=token``, a fresh ``RAY_AUTH_TOKEN`` per cluster, given to the nodes and the command through
their environment only; ``<workdir>/auth_token`` keeps it for the test to look for leaks). Leaving the namespace, nothing of the cluster survives: any process
still in it is killed.

SPEC: ``{"command": [...], "workdir": DIR, "env": {...}, "timeout": S, "kill_worker_after": PATTERN}`` where
``kill_worker_after`` (optional) is a glob under ``workdir``: once a file matches it, the worker node's processes
are SIGKILLed (a node lost mid-run). With ``"try_without_token": true`` a driver without the token first tries
to connect; its exit code goes to ``<workdir>/untokened.rc`` (non-zero: refused). The command's output goes to ``<workdir>/command.log``, its exit code to
``<workdir>/command.rc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORT = 6379


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([_ray(), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _wait_for_head(head: subprocess.Popen, timeout: float) -> None:
    """Until the head's GCS port answers; fails at once when the head process ends."""
    deadline = time.monotonic() + timeout
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray head exited with {head.returncode} (see head.log)")
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError("the ray head did not open its port") from None
            time.sleep(0.2)


def _wait_for_nodes(n: int, timeout: float) -> None:
    import ray

    deadline = time.monotonic() + timeout
    ray.init(address=f"127.0.0.1:{PORT}", _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        while sum(1 for node in ray.nodes() if node.get("Alive")) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not reach {n} nodes")
            time.sleep(0.2)
    finally:
        ray.shutdown()


def _namespace_pids(netns: str, test_netns: str) -> list[int]:
    """Every process in network namespace ``netns`` but this one; none when ``netns`` is the test's own
    (``unshare`` made no namespace: the processes there are not only ours)."""
    if netns == test_netns:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == netns:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


_UNTOKENED = (
    "import ray, sys\n"
    "try:\n"
    "    ray.init(address=sys.argv[1], log_to_driver=False)\n"
    "except Exception as exc:\n"
    "    print(type(exc).__name__, exc)\n"
    "    sys.exit(3)\n"
)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["workdir"])
    token = secrets.token_hex(32)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})  # the nodes and drivers inherit it
    (work / "auth_token").write_text(token)
    (work / "netns").write_text(os.readlink("/proc/self/ns/net"))  # for the caller's clean-up on a time-out
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # AF_UNIX socket paths must stay under 108 bytes
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = _start(["--head", f"--port={PORT}", f"--temp-dir={temp}", "--include-dashboard=false", *common],
                  work / "head.log")  # fmt: skip
    worker = None
    rc = 1
    try:
        _wait_for_head(head, 60)
        _wait_for_nodes(1, 60)
        worker = _start([f"--address=127.0.0.1:{PORT}", *common], work / "worker.log")
        _wait_for_nodes(2, 60)
        if spec.get("try_without_token"):
            bare = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
            tried = subprocess.run([sys.executable, "-c", _UNTOKENED, f"127.0.0.1:{PORT}"], env=bare,
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
            (work / "untokened.rc").write_text(str(tried.returncode))
            (work / "untokened.log").write_text(tried.stdout + tried.stderr)
        env = {**os.environ, **spec.get("env", {}), "RAY_ADDRESS": f"127.0.0.1:{PORT}"}
        with open(work / "command.log", "wb") as log:
            command = subprocess.Popen(
                spec["command"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work
            )
            deadline = time.monotonic() + float(spec.get("timeout", 300))
            pattern = spec.get("kill_worker_after")
            while command.poll() is None:
                if pattern and list(work.glob(pattern)):
                    _kill_group(worker, signal.SIGKILL)  # the node and its actors, gone at once
                    (work / "worker_killed").write_text(str(time.time()))
                    pattern = None
                if time.monotonic() > deadline:
                    command.kill()
                    break
                time.sleep(0.02)
            rc = command.wait()
        (work / "command.rc").write_text(str(rc))
    finally:
        for proc in (worker, head):
            if proc is not None:
                _kill_group(proc, signal.SIGTERM)
        for proc in (worker, head):
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _kill_group(proc, signal.SIGKILL)
        here, parent = os.readlink("/proc/self/ns/net"), os.readlink(f"/proc/{os.getppid()}/ns/net")
        for pid in _namespace_pids(here, parent):  # raylet/worker processes that left the groups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def run_in_cluster(spec: dict) -> subprocess.CompletedProcess:
    """Run ``spec`` (see the module docstring) in a new network namespace with a two-node cluster."""
    work = Path(spec["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    try:
        return subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.ray_cluster", str(spec_file)],
                          cwd=repo, env=env, timeout=float(spec.get("timeout", 300)) + 120, capture_output=True,
                          text=True)  # fmt: skip
    except subprocess.TimeoutExpired:  # the harness was killed: end what it left in its namespace
        netns = work / "netns"
        if netns.exists():
            for pid in _namespace_pids(netns.read_text(), os.readlink("/proc/self/ns/net")):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        raise


def can_unshare() -> bool:
    """Whether this process may make a network namespace (root, or a user namespace allowed)."""
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
