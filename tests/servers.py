"""Real servers for tests: `python -m proxy ...` in a child process on an ephemeral loopback port.

Every line a server logs is kept (for the secret scan), and every byte a test client receives is
recorded through `RecordingTransport`, so `tests/test_zz_secrets.py` can prove nothing leaked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEST_API_KEY = "sk_test_" + "k3y" * 12
SESSION_SECRET = "test-session-secret-3f3af1ecebbd1410ab417ec0d27bbfcb5d340e177ae1"
START_TIMEOUT = 20.0
REDIS_START_SECONDS = 10.0
# Loopback only; every write appended and synced to disk before the reply, no snapshots.
REDIS_OPTIONS = ["--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "always", "--save", ""]

# Everything any server logged and any client received in this pytest run.
SEEN_LOG_LINES: list[str] = []
SEEN_RESPONSES: list[bytes] = []


EVENTUALLY_SECONDS = 10.0


def eventually(check: Callable[[], Any], what: str, timeout: float = EVENTUALLY_SECONDS) -> Any:
    """Poll `check` until it returns something truthy; fail if it has not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        time.sleep(0.02)
    return result


def stop_process(process: subprocess.Popen[str], sig: int = signal.SIGTERM, grace: float = 10.0) -> int:
    """Ask a process to end with `sig`; kill it if it has not within `grace` seconds."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


@dataclass
class ServerProcess:
    command: list[str]
    env: dict[str, str]
    url: str = ""
    logs: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    port: int = 0  # 0: a free one; a fixed port when the URL must be known before the start (BFF_PUBLIC_URL)

    def start(self) -> ServerProcess:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *self.command, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.env.get("TEST_CWD", str(ROOT)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or not self.url:
            self.stop()
            raise RuntimeError(f"{self.command} did not start:\n" + "\n".join(self.logs))
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.logs.append(line)
            SEEN_LOG_LINES.append(line)
            if not self.url:
                entry = parse_json(line)
                if entry.get("message") == "listening":
                    self.url = str(entry["url"])
                    self._ready.set()
        self._ready.set()

    def log_entries(self) -> list[dict[str, Any]]:
        return [entry for entry in map(parse_json, self.logs) if entry]

    def wait_for_log(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first log entry matching `predicate`, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_entries():
                if predicate(entry):
                    return entry
            time.sleep(0.02)
        raise AssertionError("no matching log line:\n" + "\n".join(self.logs[-20:]))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process, sig, grace=15)


@dataclass
class RedisServer:
    """A `redis-server` on a free loopback port, persisting every write (AOF) so a restart loses nothing.

    `stop()` then `start()` restarts it on the same port with the same data, as an orchestrator would.
    """

    executable: str
    data_dir: Path
    port: int = 0
    logs: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--dir", str(self.data_dir), *REDIS_OPTIONS],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._read, args=(self.process, ready), daemon=True).start()
        if not ready.wait(REDIS_START_SECONDS) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("redis-server did not start:\n" + "\n".join(self.logs[-20:]))
        return self

    def _read(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.logs.append(line.rstrip("\n"))
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # exited: start() sees poll() is not None

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), as an orchestrator would do; the AOF already holds every write."""
        if self.process is not None:
            stop_process(self.process)
        self.process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parse_json(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def proxy_env(upstream_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "BFF_UPSTREAM_URL": upstream_url,
        "BFF_API_KEY": TEST_API_KEY,
        "BFF_SESSION_SECRETS": SESSION_SECRET,
        "BFF_WORKFLOWS": "tutor=wf_tutor,story=wf_story",
        "BFF_AUTH": "guest",
        "BFF_COOKIE_SECURE": "false",
        # Every test signs in from 127.0.0.1; limits are tested with their own proxies.
        "BFF_RATE_LIMITS": "mint=10000/minute;relay=10000/minute;login=10000/minute",
        "BFF_MAX_CONCURRENT_STREAMS": "100",
        # A client that leaves ends its run at once, as before runs outlived connections; the grace
        # period has its own tests (tests/test_runs.py).
        "BFF_RESUME_GRACE_SECONDS": "0",
        # Every test's guests come from 127.0.0.1 and stand for separate users; guests sharing their
        # address's limits (the default) is tested in tests/test_guest_sessions.py.
        "BFF_GUEST_LIMITS": "session",
    }
    env.update(overrides)
    return env


def start_emulator(**env: str) -> ServerProcess:
    return ServerProcess(["emulator", "--chunk-delay", "0.01"], {"BFF_API_KEY": TEST_API_KEY, **env}).start()


def start_proxy(upstream_url: str, **overrides: str) -> ServerProcess:
    return ServerProcess(["serve"], proxy_env(upstream_url, **overrides)).start()


class _RecordedStream(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            SEEN_RESPONSES.append(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()


class RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that also keeps every response header and body byte it delivers."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        SEEN_RESPONSES.append(b"\n".join(k + b": " + v for k, v in response.headers.raw))
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _RecordedStream(response.stream)
        return response


def browser(base_url: str, **kwargs: Any) -> httpx.Client:
    """A client that behaves like our frontend: same-origin, cookie jar, `X-CSRF: 1`."""
    headers = {"X-CSRF": "1", **kwargs.pop("headers", {})}
    return httpx.Client(base_url=base_url, headers=headers, transport=RecordingTransport(), timeout=30.0, **kwargs)


class EmulatorControl:
    """Drives the emulated upstream's `/_control` API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30.0)

    def reset(self) -> None:
        self.http.post("/_control/reset").raise_for_status()

    def fault(self, **rule: Any) -> None:
        self.http.post("/_control/faults", json=rule).raise_for_status()

    def release(self) -> None:
        self.http.post("/_control/release").raise_for_status()

    def requests(self, op: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.http.get("/_control/requests").json()
        return [r for r in found if op is None or r["op"] == op]

    def events(self, **match: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.http.get("/_control/events", params=match).json()
        return found

    def wait(self, count: int = 1, timeout: float = 10.0, **match: str) -> list[dict[str, Any]]:
        """Block until `count` events match; fail the test if they never come."""
        response = self.http.get("/_control/wait", params={**match, "count": count, "timeout": timeout})
        assert response.status_code == 200, f"waited for {match}, saw {response.json()}"
        found: list[dict[str, Any]] = response.json()
        return found


@contextmanager
def guest_of(server_url: str) -> Iterator[httpx.Client]:
    """A browser signed in as a fresh guest on `server_url`."""
    with browser(server_url) as client:
        client.post("/auth/guest").raise_for_status()
        yield client


@contextmanager
def replicas_of(upstream_url: str, count: int = 2, **overrides: str) -> Iterator[list[ServerProcess]]:
    """`count` proxies with the same settings (give them one BFF_STORAGE_URL to make them replicas),
    all stopped afterwards, also when one fails to start."""
    servers: list[ServerProcess] = []
    try:
        for _ in range(count):
            servers.append(start_proxy(upstream_url, **overrides))
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextmanager
def proxy_with(upstream_url: str, **overrides: str) -> Iterator[httpx.Client]:
    """A proxy of its own, started with `overrides`, and a guest signed in on it; stopped afterwards."""
    server = start_proxy(upstream_url, **overrides)
    try:
        with guest_of(server.url) as client:
            yield client
    finally:
        server.stop()
