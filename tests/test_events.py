"""Run-end webhooks (CONTRACT C5, docs/events.md), over live servers and a real receiver on 127.0.0.1.

The receiver here fails on purpose (500, a dropped connection, no answer at all) and is down across a
proxy restart; every signature is checked with the code docs/events.md gives (Python and Node), run
as it is written there.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import ValidationError

from proxy.cli import ConfigError, checked_settings
from proxy.emulator import generate_text, split_chunks
from proxy.events import RunEnded, signed_headers, webhook_key
from proxy.events.delivery import MAX_RETRY_SECONDS, DeliverySettings, RunEvents, retry_delay
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.storage import MemoryStorage
from tests.conftest import require_tool
from tests.servers import (
    EmulatorControl,
    RedisServer,
    ServerProcess,
    eventually,
    free_port,
    guest_of,
    proxy_env,
    replicas_of,
    start_proxy,
)
from tests.test_chat_protocols import sse_events, text_of

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "events.md"
SECRET = "whsec_" + base64.b64encode(bytes(range(7, 39))).decode()
STREAM = "/api/workflows/tutor/stream"
TUTOR_INPUTS = {"message": "fractions"}
TUTOR_TEXT = generate_text("wf_tutor", TUTOR_INPUTS)
STORY_INPUTS = {"topic": "dragons"}
STORY_TEXT = generate_text("wf_story", STORY_INPUTS)


def event_env(url: str, **overrides: str) -> dict[str, str]:
    """Webhook settings for a test: short attempts and quick retries, so failures cost little time."""
    return {
        "BFF_EVENTS_URL": url,
        "BFF_EVENTS_SECRET": SECRET,
        "BFF_EVENTS_TIMEOUT_SECONDS": "2",
        "BFF_EVENTS_RETRY_SECONDS": "0.2",
        "BFF_EVENTS_MAX_ATTEMPTS": "50",
        **overrides,
    }


def chat_body(chat_id: str) -> dict[str, Any]:
    return {"id": chat_id, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "fractions"}]}]}


# The receiver


@dataclass
class Attempt:
    headers: dict[str, str]
    body: bytes
    answer: str  # what the receiver did: "500", "closed", "held", "204"
    path: str = "/hooks/bff"

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found


@dataclass
class Receiver:
    """An HTTP endpoint that records every attempt and answers per `plan(n)`, n being the attempt's
    number for its webhook-id: a status ("500", "307" to /elsewhere, "204"), "closed" (the connection
    dropped unanswered) or "hold" (no answer until `release()`)."""

    plan: Callable[[int], str] = lambda n: "204"
    port: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _released: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bff"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._changed:
                    number = 1 + sum(a.event_id == headers.get("webhook-id") for a in receiver.attempts)
                    answer = receiver.plan(number)
                    attempt = Attempt(headers, body, "held" if answer == "hold" else answer, self.path)
                    receiver.attempts.append(attempt)
                    receiver._changed.notify_all()
                if answer == "hold":
                    receiver._released.wait()
                    answer = attempt.answer = "204"
                if answer == "closed":
                    self.close_connection = True
                    return
                try:
                    self.send_response(int(answer))
                    if answer.startswith("3"):
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the proxy gave up waiting
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def delivered(self) -> list[Attempt]:
        with self._changed:
            return [a for a in self.attempts if a.answer.startswith("2")]

    def wait_for(self, check: Callable[[list[Attempt]], bool], what: str, timeout: float = 30.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: check(self.attempts), timeout):
                raise AssertionError(f"the receiver never saw {what}; saw {[a.answer for a in self.attempts]}")

    def wait_for_delivered(self, count: int, timeout: float = 30.0) -> list[Attempt]:
        self.wait_for(lambda found: sum(a.answer.startswith("2") for a in found) >= count, f"{count} deliveries")
        return self.delivered()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def event_metric(server: ServerProcess, outcome: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf'^bff_events_total\{{outcome="{outcome}"\}} (\S+)$', text, re.MULTILINE)
    assert found, f"bff_events_total{{outcome={outcome!r}}} missing"
    return float(found.group(1))


# The documented verification code, run as written


def doc_block(language: str) -> str:
    [block] = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)
    return block


def verify_with_python(secret: str, attempts: list[Attempt]) -> list[Any]:
    namespace: dict[str, Any] = {}
    exec(doc_block("python"), namespace)  # noqa: S102 - our own documentation, under test
    results: list[Any] = []
    for attempt in attempts:
        try:
            results.append(namespace["verify"](secret, attempt.headers, attempt.body))
        except ValueError as exc:
            results.append({"error": str(exc)})
    return results


def verify_with_node(secret: str, attempts: list[Attempt], tmp_path: Path) -> list[Any]:
    node = require_tool("node")
    (tmp_path / "verify.mjs").write_text(doc_block("js"))
    (tmp_path / "run.mjs").write_text(
        'import { readFileSync } from "node:fs";\n'
        'import { verify } from "./verify.mjs";\n'
        'const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));\n'
        "console.log(JSON.stringify(cases.map((c) => {\n"
        '  try { return verify(c.secret, c.headers, Buffer.from(c.body, "base64")); }\n'
        "  catch (error) { return { error: error.message }; }\n"
        "})));\n"
    )
    cases = [{"secret": secret, "headers": a.headers, "body": base64.b64encode(a.body).decode()} for a in attempts]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run(
        [node, "run.mjs", "cases.json"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    found: list[Any] = json.loads(done.stdout)
    return found


def tampered(attempt: Attempt, **changes: Any) -> Attempt:
    return Attempt({**attempt.headers, **changes.get("headers", {})}, changes.get("body", attempt.body), "")


# Delivered once, through failures, signed as documented


def test_each_run_is_delivered_once_through_failed_attempts_and_verifies_with_the_documented_code(
    emulator: ServerProcess, upstream: EmulatorControl, tmp_path: Path
) -> None:
    plan = {1: "500", 2: "closed"}
    receiver = Receiver(plan=lambda n: plan.get(n, "204")).start()
    server = start_proxy(emulator.url, **event_env(receiver.url))
    try:
        with guest_of(server.url) as client:
            streamed = client.post(STREAM, json=TUTOR_INPUTS)
            whole = client.post("/api/workflows/story/run", json=STORY_INPUTS)
            upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
            with client.stream("POST", "/api/chat/tutor", json=chat_body("chat-1")) as chat:
                body = chat.iter_raw()
                received = next(body)
                assert client.post("/api/chat/tutor/chat-1/stop").status_code == 204
                received += b"".join(body)
            user_id = client.get("/auth/session").json()["user"]["id"]

        delivered = receiver.wait_for_delivered(3)
        eventually(lambda: event_metric(server, "delivered") == 3, "3 deliveries counted")
        retried = event_metric(server, "retried")
    finally:
        server.stop()
        receiver.stop()

    runs = {
        streamed.headers["x-run-id"]: ("complete", TUTOR_TEXT, None),
        whole.headers["x-run-id"]: ("complete", whole.json()["result"], None),
        chat.headers["x-run-id"]: ("stopped", text_of(sse_events(received.decode())), "chat-1"),
    }
    assert streamed.text == TUTOR_TEXT and whole.json()["result"] == STORY_TEXT
    assert runs[chat.headers["x-run-id"]][1] == split_chunks(TUTOR_TEXT)[0]
    assert len(delivered) == 3 and retried == 6
    for attempt in delivered:
        data = attempt.event["data"]
        end, text, chat_id = runs[data["run_id"]]
        tries = [a for a in receiver.attempts if a.event_id == attempt.event_id]
        assert [a.answer for a in tries] == ["500", "closed", "204"]
        assert {a.body for a in tries} == {attempt.body}  # the same event every time, under one id
        assert attempt.event_id == "evt_" + data["run_id"].removeprefix("run_")
        assert attempt.event["type"] == "run.ended"
        assert data["user_id"] == user_id
        assert data["workflow"] == ("story" if data["run_id"] == whole.headers["x-run-id"] else "tutor")
        assert (data["end"], data["chars"], data["chat_id"]) == (end, len(text), chat_id)
        assert "text" not in data  # BFF_EVENTS_INCLUDE_TEXT is off
        timings = data["timings"]
        assert timings["duration_ms"] >= timings["first_byte_ms"] > 0
        assert timings["started_at"].endswith("Z")

    for verified in (
        verify_with_python(SECRET, receiver.attempts),
        verify_with_node(SECRET, receiver.attempts, tmp_path),
    ):
        assert verified == [a.event for a in receiver.attempts]

    # The secret is in no log line, no event, no header and nothing a client received.
    key_text = SECRET.removeprefix("whsec_")
    seen = "\n".join(server.logs) + "".join(f"{a.headers}{a.body.decode()}" for a in receiver.attempts)
    seen += streamed.text + whole.text + received.decode()
    assert SECRET not in seen and key_text not in seen


def test_the_documented_code_refuses_a_forgery_a_replay_and_another_secret(tmp_path: Path) -> None:
    body = RunEnded("run_x", "u1", "tutor", None, "complete", 3, 1.0e9, 1.0, 2.0, None).body(1.0e9).encode()
    now = int(time.time())
    good = Attempt(signed_headers(webhook_key(SECRET), "evt_x", now, body), body, "")
    plain_secret = "a-plain-secret-of-enough-randomness-4b1e9f0c7d2a"
    plain = Attempt(signed_headers(webhook_key(plain_secret), "evt_x", now, body), body, "")
    old = now - 6 * 60
    cases = [
        good,
        tampered(good, body=body.replace(b'"chars":3', b'"chars":4')),
        tampered(good, headers={"webhook-id": "evt_other"}),
        Attempt(signed_headers(webhook_key(SECRET), "evt_x", old, body), body, ""),  # a replay, 6 min later
        tampered(good, headers={"webhook-timestamp": "soon"}),
        tampered(good, headers={"webhook-signature": "v1,bm90IGl0 " + good.headers["webhook-signature"]}),
        tampered(good, headers={"webhook-signature": "v1,é"}),  # refused, not a TypeError (a 500)
        tampered(good, headers={"webhook-timestamp": "\u0661\u0667" + "\u0660" * 8}),  # Arabic-Indic digits
    ]
    expected_errors = [None, "signature", "signature", "window", "window", None, "signature", "window"]

    for secret, attempts, expected in ((SECRET, cases, expected_errors), (plain_secret, [plain], [None])):
        for results in (verify_with_python(secret, attempts), verify_with_node(secret, attempts, tmp_path)):
            for result, error in zip(results, expected, strict=True):
                if error is None:
                    assert result == json.loads(body)
                else:
                    assert error in result["error"]
    assert "error" in verify_with_python("whsec_" + base64.b64encode(b"another key of 24+ bytes..").decode(), [good])[0]


# What the event says


def test_with_include_text_the_event_carries_exactly_the_text_each_client_received(
    emulator: ServerProcess, upstream: EmulatorControl, receiver: Receiver
) -> None:
    server = start_proxy(emulator.url, **event_env(receiver.url, BFF_EVENTS_INCLUDE_TEXT="true"))
    try:
        with guest_of(server.url) as client:
            streamed = client.post(STREAM, json={"message": "héllo ✓ fractions"})
            whole = client.post("/api/workflows/story/run", json=STORY_INPUTS)
            chat = client.post("/api/chat/tutor", json=chat_body("chat-2"))
        delivered = {a.event["data"]["run_id"]: a.event["data"] for a in receiver.wait_for_delivered(3)}
    finally:
        server.stop()

    for response, text in (
        (streamed, streamed.text),
        (whole, whole.json()["result"]),
        (chat, text_of(sse_events(chat.text))),
    ):
        data = delivered[response.headers["x-run-id"]]
        assert (data["text"], data["chars"], data["end"]) == (text, len(text), "complete")
    assert delivered[chat.headers["x-run-id"]]["chat_id"] == "chat-2"
    logs = "\n".join(server.logs)
    assert streamed.text not in logs and whole.json()["result"] not in logs


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(emulator: ServerProcess, upstream: EmulatorControl) -> None:
    receiver = Receiver(plan=lambda n: "307" if n == 1 else "204").start()
    server = start_proxy(emulator.url, **event_env(receiver.url))
    try:
        with guest_of(server.url) as client:
            client.post(STREAM, json=TUTOR_INPUTS).raise_for_status()
        receiver.wait_for_delivered(1)
    finally:
        server.stop()
        receiver.stop()

    assert [(a.answer, a.path) for a in receiver.attempts] == [("307", "/hooks/bff"), ("204", "/hooks/bff")]


def test_a_run_refused_before_its_answer_has_an_event_with_no_text(
    emulator: ServerProcess, upstream: EmulatorControl, receiver: Receiver
) -> None:
    server = start_proxy(emulator.url, **event_env(receiver.url, BFF_EVENTS_INCLUDE_TEXT="true"))
    try:
        with guest_of(server.url) as client:
            upstream.fault(op="run", status=500)
            refused = client.post("/api/workflows/story/run", json=STORY_INPUTS)
        [delivered] = receiver.wait_for_delivered(1)
    finally:
        server.stop()

    assert refused.status_code == 502
    data = delivered.event["data"]
    assert (data["end"], data["chars"], data["text"]) == ("refused:upstream_error", 0, "")
    assert data["timings"]["first_byte_ms"] is None


# Never in a relay's way


def test_a_receiver_that_never_answers_slows_no_answer(emulator: ServerProcess, upstream: EmulatorControl) -> None:
    receiver = Receiver(plan=lambda n: "hold").start()
    server = start_proxy(emulator.url, **event_env(receiver.url, BFF_EVENTS_TIMEOUT_SECONDS="60"))
    try:
        with guest_of(server.url) as client:
            assert client.post(STREAM, json=TUTOR_INPUTS).text == TUTOR_TEXT
            receiver.wait_for(lambda found: len(found) == 1, "the first event")
            # Every deliverer is soon stuck on the receiver, and the answers still come whole.
            answers = [client.post(STREAM, json=TUTOR_INPUTS).text for _ in range(6)]
            receiver.wait_for(lambda found: len(found) == 4, "an event per deliverer")
            answers += [client.post(STREAM, json=TUTOR_INPUTS).text for _ in range(2)]
            assert answers == [TUTOR_TEXT] * 8
            assert [a.answer for a in receiver.attempts] == ["held"] * 4  # none answered yet
            receiver.release()
            receiver.wait_for_delivered(9)
    finally:
        server.stop()
        receiver.stop()


# With Redis: a restart, and replicas


@pytest.fixture
def shared_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server
    client.close()


def outbox_size(server: RedisServer) -> int:
    with redis.Redis.from_url(server.url) as client:
        return int(client.zcard("bff:events:due"))


def test_events_a_dead_receiver_missed_survive_a_restart_and_are_delivered_once_after(
    emulator: ServerProcess, upstream: EmulatorControl, shared_redis: RedisServer
) -> None:
    receiver = Receiver(port=free_port())  # nothing listens there yet: every attempt is refused
    env = {"BFF_STORAGE_URL": shared_redis.url, **event_env(receiver.url)}
    first = start_proxy(emulator.url, **env)
    try:
        with guest_of(first.url) as client:
            run_ids = {client.post(STREAM, json=TUTOR_INPUTS).headers["x-run-id"] for _ in range(3)}
        eventually(lambda: event_metric(first, "retried") >= 3, "an attempt at each event")
    finally:
        first.stop()
    assert outbox_size(shared_redis) == 3

    receiver.start()
    second = start_proxy(emulator.url, **env)
    try:
        receiver.wait_for_delivered(3)
        eventually(lambda: outbox_size(shared_redis) == 0, "an empty outbox")
        assert event_metric(second, "delivered") == 3
    finally:
        second.stop()
        receiver.stop()

    assert sorted(a.event["data"]["run_id"] for a in receiver.attempts) == sorted(run_ids)
    assert all(a.answer == "204" for a in receiver.attempts)


def test_two_replicas_deliver_each_event_once(
    emulator: ServerProcess, upstream: EmulatorControl, shared_redis: RedisServer, receiver: Receiver
) -> None:
    with replicas_of(emulator.url, 2, BFF_STORAGE_URL=shared_redis.url, **event_env(receiver.url)) as servers:
        run_ids = []
        for server in servers:
            with guest_of(server.url) as client:
                run_ids += [client.post(STREAM, json=TUTOR_INPUTS).headers["x-run-id"] for _ in range(4)]
        receiver.wait_for_delivered(8)
        eventually(lambda: outbox_size(shared_redis) == 0, "an empty outbox")
        assert sum(event_metric(server, "delivered") for server in servers) == 8

    assert sorted(a.event["data"]["run_id"] for a in receiver.attempts) == sorted(run_ids)


# Units: the settings, the schedule, the signature


def test_the_signature_is_the_standard_webhooks_one() -> None:
    # The Standard Webhooks specification's own example (and its libraries' test vector).
    key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    headers = signed_headers(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')

    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_retries_double_from_the_retry_time_up_to_an_hour_with_at_most_half_taken_off() -> None:
    settings = DeliverySettings("https://x", b"k", False, 10.0, 5.0, 12, 100, 2**20)
    for attempts, full in ((1, 5.0), (2, 10.0), (5, 80.0), (11, MAX_RETRY_SECONDS), (40, MAX_RETRY_SECONDS)):
        delays = [retry_delay(settings, attempts) for _ in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_events_beyond_the_cap_in_memory_or_in_the_outbox_are_dropped_and_counted() -> None:
    metrics, storage = Metrics(), MemoryStorage()
    events = RunEvents(
        DeliverySettings("http://127.0.0.1:9/", b"k" * 32, False, 1.0, 1.0, 3, 2, 2**20), storage, metrics
    )

    def ended(n: int) -> RunEnded:
        return RunEnded(f"run_{n}", "u1", "tutor", None, "complete", 1, time.time(), 1.0, 2.0, None)

    try:
        for n in range(3):  # nothing moves them to the outbox yet: the third finds no room in memory
            events.ended(ended(n))
        await events.flush()
        for n in range(3, 5):  # room in memory, none in the outbox
            events.ended(ended(n))
        await events.flush()
    finally:
        await events.aclose()

    counted = {o: metrics.registry.get_sample_value("bff_events_total", {"outcome": o}) for o in ("queued", "dropped")}
    assert counted == {"queued": 2.0, "dropped": 3.0}
    assert [e.event_id for e in await storage.claim_events(10, lease=60.0)] == ["evt_0", "evt_1"]


@pytest.mark.anyio
async def test_what_waits_is_bounded_in_bytes_too() -> None:
    metrics, storage = Metrics(), MemoryStorage()
    events = RunEvents(
        DeliverySettings("http://127.0.0.1:9/", b"k" * 32, True, 1.0, 1.0, 3, 100, 2**20), storage, metrics
    )

    def ended(n: int, text: str) -> RunEnded:
        return RunEnded(f"run_{n}", "u1", "tutor", None, "complete", len(text), time.time(), 1.0, 2.0, text)

    long_answer = "答" * 200_000  # 600 KB in UTF-8: one fits in a MiB, two do not
    try:
        events.ended(ended(0, long_answer))
        events.ended(ended(1, long_answer))  # no room in memory
        events.ended(ended(2, "short"))
        await events.flush()
        events.ended(ended(3, long_answer))  # room in memory again, none in the outbox
        await events.flush()
    finally:
        await events.aclose()

    counted = {o: metrics.registry.get_sample_value("bff_events_total", {"outcome": o}) for o in ("queued", "dropped")}
    assert counted == {"queued": 2.0, "dropped": 2.0}
    assert {e.event_id for e in await storage.claim_events(10, lease=60.0)} == {"evt_0", "evt_2"}


def settings_error(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)  # type: ignore[call-arg]
    return str(raised.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BFF_EVENTS_URL": "http://hooks.example.com/bff"}, "https://"),
        ({"BFF_EVENTS_URL": "ftp://127.0.0.1/x"}, "https://"),
        ({"BFF_EVENTS_SECRET": "whsec_not base64!"}, "base64"),
        ({"BFF_EVENTS_SECRET": "whsec_" + base64.b64encode(b"short").decode()}, "24 bytes"),
        ({"BFF_EVENTS_SECRET": "changeme-changeme-changeme-changeme"}, "random string"),
    ],
)
def test_bad_event_settings_stop_start_up(env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert message in settings_error(env, monkeypatch)


def test_an_events_url_without_a_secret_is_named_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in proxy_env("http://127.0.0.1:1", BFF_EVENTS_URL="https://hooks.example.com/bff").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        checked_settings()
    assert str(refused.value) == "BFF_EVENTS_SECRET (BFF_EVENTS_URL is set: events are signed with it): required"

    monkeypatch.setenv("BFF_EVENTS_SECRET", SECRET)
    settings = checked_settings()
    assert SECRET in settings.secret_values()  # so the log scrubber knows it
