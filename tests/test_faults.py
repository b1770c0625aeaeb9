"""The fault suite: every way the upstream, Redis, the client or a shutdown can misbehave, over live
processes, each asserting what the client observes, exactly, and that nothing is left behind.

"Nothing left behind" (`assert_nothing_leaked`) is checked from outside the proxy: `bff_open_streams`
is back to 0, the emulated upstream saw every stream it started end (no upstream connection left
open), and the user's one stream slot (`BFF_MAX_CONCURRENT_STREAMS=1` here) can be taken again.

Upstream status mapping on the JSON routes is in tests/test_upstream_errors.py, the chat protocols'
framing of cuts and deadlines in tests/test_chat_protocols.py; this file adds the faults they do not
cover and the leak checks.
"""

from __future__ import annotations

import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import INTERRUPTED, RESTARTING
from tests.conftest import start_redis
from tests.servers import EmulatorControl, ServerProcess, browser, eventually, free_port, start_proxy
from tests.test_chat_protocols import REQUEST, data_parts, sse_events, text_of
from tests.test_metrics import sample

STREAM = "/api/workflows/tutor/stream"
INPUTS = {"message": "fractions"}
ANSWER = generate_text("wf_tutor", INPUTS)
CHUNKS = split_chunks(ANSWER)
PROTOCOLS = ["text", "ui", "data"]
SETTLE_SECONDS = 10.0
PATIENCE = httpx.Timeout(10.0, read=0.5)  # a client that gives up half a second into a silence

NO_CREDITS = "The upstream account has no credits left."
NOT_FOUND = "The upstream service does not know this workflow."
BUSY = "The upstream service is busy; try again shortly."
FAILED = "The upstream service failed."
UNREACHABLE = "The upstream service could not be reached."
NO_STORAGE = "The service cannot reach its storage. Try again shortly."


def path_for(protocol: str) -> str:
    """`text` is the plain relay route; `ui` and `data` are the chat route's protocols."""
    return STREAM if protocol == "text" else f"/api/chat/tutor?protocol={protocol}"


def body_for(protocol: str) -> dict[str, Any]:
    return INPUTS if protocol == "text" else REQUEST


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics").text


def settled_metrics(server: ServerProcess) -> str:
    """The metrics once no relay is open: a relay finishes its bookkeeping just after its last byte."""

    def when_settled() -> str | None:
        text = metrics(server)
        return text if sample(text, "bff_open_streams") == 0 else None

    settled: str = eventually(when_settled, "no relay open", SETTLE_SECONDS)
    return settled


def assert_nothing_leaked(server: ServerProcess, client: httpx.Client, upstream: EmulatorControl) -> None:
    settled_metrics(server)
    started = upstream.events(kind="stream_start")
    if started:
        upstream.wait(count=len(started), kind="stream_end")  # every upstream stream was closed
    # The user's single stream slot is free: a stream is admitted (the probe answers at once).
    upstream.fault(op="stream", workflow="wf_story", chunks=["ok"])
    probe = client.post("/api/workflows/story/stream", json={"topic": "probe"})
    assert (probe.status_code, probe.text) == (200, "ok")


def delta(before: str, after: str, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def request_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [entry for entry in server.log_entries() if entry.get("message") == "request end"]


def assert_no_server_error(server: ServerProcess) -> None:
    """No request ended in a 500: every failure had a status and code of its own."""
    assert not [line for line in request_lines(server) if line["status"] == 500]
    assert not [entry for entry in server.log_entries() if entry.get("message", "").startswith("Exception in ASGI")]


@pytest.fixture(scope="module")
def faulty(emulator: ServerProcess) -> Iterator[ServerProcess]:
    """One stream per user, so a slot that is not given back shows; a breaker that never opens, so
    one test's failures do not turn the next test's answers into fast 503s."""
    server = start_proxy(emulator.url, BFF_MAX_CONCURRENT_STREAMS="1", BFF_UPSTREAM_FAILURE_THRESHOLD="1000")
    yield server
    server.stop()


@pytest.fixture
def client(faulty: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    with browser(faulty.url) as signed_in:
        signed_in.post("/auth/guest").raise_for_status()
        yield signed_in


# The upstream cannot be reached


@pytest.mark.parametrize("failure", ["connection refused", "name does not resolve"])
def test_an_unreachable_upstream_is_a_502_on_every_route_and_nothing_stays_open(failure: str) -> None:
    # A port nobody listens on, or a name that never resolves (RFC 2606).
    upstream_url = f"http://127.0.0.1:{free_port()}" if failure == "connection refused" else "http://upstream.invalid"
    server = start_proxy(upstream_url, BFF_UPSTREAM_FAILURE_THRESHOLD="1000")
    try:
        with browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()
            before = metrics(server)
            json_answers = [
                client.post("/api/token", json={"workflow": "tutor"}),
                client.post(STREAM, json=INPUTS),
                client.post("/api/workflows/tutor/run", json=INPUTS),
            ]
            chat_answers = [client.post(path_for(protocol), json=REQUEST) for protocol in ("ui", "data")]
            ready = httpx.get(server.url + "/readyz")
            after = settled_metrics(server)
    finally:
        server.stop()

    for response in json_answers:
        assert (response.status_code, response.json()["error"]["code"]) == (502, "upstream_error")
    for response in chat_answers:
        assert (response.status_code, response.text) == (502, UNREACHABLE)
    assert ready.status_code == 200  # the upstream is not a readiness dependency: restarting us fixes nothing
    # Each mint tries three times, the run once: 4 mints (token, stream, two chats) x 3 + 1.
    assert delta(before, after, "bff_upstream_errors_total", kind="connect") == 13
    assert delta(before, after, "bff_mints_total", outcome="failed") == 4
    assert delta(before, after, "bff_stream_ends_total", end="refused:upstream_error") == 3
    for line in request_lines(server)[-5:]:
        assert (line["status"], line["upstream_status"], line["upstream_error"]) == (502, None, "connect")


# The upstream is slow or silent


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_client_out_of_patience_before_the_first_byte_cancels_the_upstream_stream(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)
    before = metrics(faulty)
    request_id = secrets.token_hex(8)

    with pytest.raises(httpx.ReadTimeout):
        client.post(path_for(protocol), json=body_for(protocol), timeout=PATIENCE, headers={"X-Request-ID": request_id})

    [ended] = upstream.wait(kind="stream_end")
    assert ended["reason"] == "cancelled"
    line = faulty.wait_for_log(lambda e: e.get("message") == "request end" and e.get("request_id") == request_id)
    assert (line["status"], line["end"]) == (499, "client_gone_early")  # as nginx logs a client that left
    after = settled_metrics(faulty)
    assert delta(before, after, "bff_client_disconnects_total", stage="before_first_byte") == 1
    assert delta(before, after, "bff_stream_ends_total", end="client_gone_early") == 1
    assert_nothing_leaked(faulty, client, upstream)


def test_a_slow_mint_still_relays_the_whole_answer(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="mint", stall=60)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, STREAM, json=INPUTS)
        eventually(lambda: len(upstream.requests("mint")) == 1, "the mint reached the upstream")
        upstream.release()
        response = pending.result(timeout=30)

    assert (response.status_code, response.text) == (200, ANSWER)
    assert len(upstream.requests("mint")) == 1  # slow is not failed: no retry
    assert_nothing_leaked(faulty, client, upstream)


def test_a_client_that_leaves_during_a_slow_mint_never_starts_a_stream(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="mint", stall=60)
    before = metrics(faulty)

    with pytest.raises(httpx.ReadTimeout):
        client.post(path_for("ui"), json=REQUEST, timeout=PATIENCE)

    after = settled_metrics(faulty)
    upstream.release()
    upstream.wait(kind="mint")  # the abandoned mint is answered by the upstream, and nobody uses it
    assert upstream.requests("stream") == []
    assert delta(before, after, "bff_client_disconnects_total", stage="before_first_byte") == 1
    assert_nothing_leaked(faulty, client, upstream)


# The upstream answers, then fails


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_upstream_cut_mid_stream_is_an_explicit_error_and_is_counted(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=3)
    before = metrics(faulty)
    received = b""

    if protocol == "text":
        # Plain text cannot carry an error: the connection drops before the final chunk.
        with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", STREAM, json=INPUTS) as response:
            for chunk in response.iter_raw():
                received += chunk
        assert received.decode() == "".join(CHUNKS[:3])
    else:
        body = client.post(path_for(protocol), json=REQUEST).text
        if protocol == "ui":
            events = sse_events(body)
            assert text_of(events) == "".join(CHUNKS[:3])
            assert events[-2:] == [{"type": "error", "errorText": INTERRUPTED}, "[DONE]"]
        else:
            assert data_parts(body) == [*(("0", chunk) for chunk in CHUNKS[:3]), ("3", INTERRUPTED)]

    after = settled_metrics(faulty)
    assert delta(before, after, "bff_upstream_errors_total", kind="cut") == 1
    assert delta(before, after, "bff_stream_ends_total", end="upstream_cut") == 1
    assert_nothing_leaked(faulty, client, upstream)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_upstream_that_answers_200_then_hangs_up_is_an_explicit_error(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", drop=True)

    if protocol == "text":
        with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", STREAM, json=INPUTS) as response:
            assert response.status_code == 200  # the upstream's 200 was passed on before it hung up
            response.read()
    else:
        response = client.post(path_for(protocol), json=REQUEST)
        assert response.status_code == 200
        if protocol == "ui":
            assert sse_events(response.text) == [{"type": "error", "errorText": INTERRUPTED}, "[DONE]"]
        else:
            assert data_parts(response.text) == [("3", INTERRUPTED)]
    assert_nothing_leaked(faulty, client, upstream)


# Raw bytes, whole or not: "é" split across chunks, bytes that are no UTF-8 at all, a NUL, and a
# character cut off by the end of the stream.
GARBAGE = [b"h\xc3", b"\xa9llo ", b"\xff\xfe", b"\xe2\x82", b"wor", b"\x00ld", b"\xe2\x82"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_garbage_and_split_utf8_are_relayed_as_bytes_or_as_replacement_characters(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", chunks=[chunk.decode("latin-1") for chunk in GARBAGE])
    raw = b"".join(GARBAGE)

    response = client.post(path_for(protocol), json=body_for(protocol))

    assert response.status_code == 200
    if protocol == "text":
        assert response.content == raw  # plain text is the upstream's bytes, untouched
    elif protocol == "ui":
        events = sse_events(response.text)
        assert text_of(events) == raw.decode("utf-8", "replace") == "héllo \ufffd\ufffd\ufffdwor\x00ld\ufffd"
        assert events[-2:] == [{"type": "finish"}, "[DONE]"]
    else:
        parts = data_parts(response.text)
        assert "".join(value for code, value in parts if code == "0") == raw.decode("utf-8", "replace")
        assert parts[-1] == ("d", {"finishReason": "stop"})
    assert_nothing_leaked(faulty, client, upstream)


# Upstream error statuses, before streaming: on the chat route they are short text bodies


@pytest.mark.parametrize("op", ["mint", "stream"])
@pytest.mark.parametrize(
    ("upstream_status", "status", "message"),
    [(402, 402, NO_CREDITS), (404, 404, NOT_FOUND), (429, 503, BUSY), (500, 502, FAILED)],
)
def test_upstream_error_statuses_reach_a_chat_as_its_status_and_a_short_text(
    faulty: ServerProcess,
    client: httpx.Client,
    upstream: EmulatorControl,
    op: str,
    upstream_status: int,
    status: int,
    message: str,
) -> None:
    # A 500 on a mint is retried, so it must last for every attempt to be seen.
    times = 3 if (op, upstream_status) == ("mint", 500) else 1
    upstream.fault(op=op, status=upstream_status, retry_after=1, times=times)

    response = client.post(path_for("ui"), json=REQUEST)

    assert (response.status_code, response.text) == (status, message)
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    if status == 503:
        assert response.headers["retry-after"] == "1"
    if op == "mint":
        assert upstream.requests("stream") == []
    if (op, upstream_status) == ("mint", 429):
        # Minting pauses for the upstream's Retry-After; the leak check needs a mint again.
        eventually(lambda: client.post("/api/token", json={"workflow": "tutor"}).status_code == 200, "mints resume")
    assert_nothing_leaked(faulty, client, upstream)


# Redis goes away under a running stream, and comes back


def test_redis_dying_and_returning_fails_new_relays_closed_and_lets_running_ones_finish(
    emulator: ServerProcess, upstream: EmulatorControl, tmp_path: Path
) -> None:
    redis = start_redis(tmp_path)
    # Short leases: a slot whose release was lost while Redis was down lapses within a second.
    server = start_proxy(
        emulator.url, BFF_STORAGE_URL=redis.url, BFF_MAX_CONCURRENT_STREAMS="1", BFF_STREAM_LEASE_SECONDS="1"
    )
    try:
        with browser(server.url) as client, browser(server.url) as other:
            client.post("/auth/guest").raise_for_status()
            other.post("/auth/guest").raise_for_status()
            upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
            with client.stream("POST", STREAM, json=INPUTS) as running:
                chunks = running.iter_raw()
                first = next(chunks)
                redis.stop()
                refused = other.post(path_for("ui"), json=REQUEST)
                not_ready = httpx.get(server.url + "/readyz")
                upstream.release()
                rest = b"".join(chunks)
            redis.start()  # same port, same data
            assert httpx.get(server.url + "/readyz").status_code == 200

            assert (refused.status_code, refused.text) == (503, NO_STORAGE)
            assert refused.headers["retry-after"].isdigit()
            assert not_ready.status_code == 503
            assert (first + rest).decode() == ANSWER  # the running stream never needed Redis to finish
            eventually(lambda: client.get("/auth/session").status_code == 200, "the session is back")
            settled_metrics(server)
            # The release was lost with Redis; the slot lapses, then the user can stream again.
            upstream.fault(op="stream", workflow="wf_story", chunks=["ok"], times=None)
            eventually(lambda: client.post("/api/workflows/story/stream", json={}).text == "ok", "the slot lapsed")
            assert_nothing_leaked(server, client, upstream)
    finally:
        server.stop()
        redis.stop()
    assert_no_server_error(server)


# The client leaves, at every stage


def _send_partial_request(server: ServerProcess, cookie: str) -> None:
    """Headers and half a body, then the client hangs up."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {STREAM} HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\nCookie: bff_session={cookie}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"mess'
        )


def test_a_client_that_leaves_while_sending_its_body_is_no_server_error(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    _send_partial_request(faulty, client.cookies["bff_session"])

    line = faulty.wait_for_log(lambda e: e.get("message") == "request end" and e.get("status") == 499)
    assert (line["route"], line["end"]) == (STREAM.replace("tutor", "{alias}"), "client_gone_early")
    assert upstream.requests() == []
    assert_no_server_error(faulty)
    assert_nothing_leaked(faulty, client, upstream)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_client_that_leaves_mid_stream_cancels_the_upstream_and_is_counted(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=2)
    before = metrics(faulty)

    with client.stream("POST", path_for(protocol), json=body_for(protocol)) as response:
        first = next(response.iter_raw()).decode()
    assert CHUNKS[0] in first

    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"
    after = settled_metrics(faulty)
    assert delta(before, after, "bff_client_disconnects_total", stage="after_first_byte") == 1
    assert delta(before, after, "bff_stream_ends_total", end="client_gone") == 1
    assert_nothing_leaked(faulty, client, upstream)


def test_a_client_that_leaves_a_run_cancels_it_and_frees_its_slot_at_once(
    faulty: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="run", stall=60)

    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/workflows/tutor/run", json=INPUTS, timeout=PATIENCE, headers={"X-Request-ID": "left-run"})

    # The upstream still stalls (never released), yet the run is over: the proxy gave up on it.
    line = faulty.wait_for_log(lambda e: e.get("message") == "request end" and e.get("request_id") == "left-run")
    assert (line["status"], line["end"]) == (499, "client_gone")
    assert_nothing_leaked(faulty, client, upstream)
    assert upstream.events(kind="run") == []  # the stalled run never completed for anybody


# SIGTERM with 50 streams open

DRAIN_SECONDS = 3
OPEN_STREAMS = 50


def _stream_until_the_end(
    client: httpx.Client, path: str, body: dict[str, Any], first_chunk: threading.Semaphore
) -> tuple[str, bytes]:
    """("complete", body) when the stream ended cleanly, ("broken", what arrived) when it was dropped."""
    received = b""
    signalled = False
    try:
        with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                received += chunk
                if not signalled:
                    first_chunk.release()
                    signalled = True
    except httpx.RemoteProtocolError:
        return "broken", received
    finally:
        if not signalled:
            first_chunk.release()
    return "complete", received


def test_sigterm_with_50_open_streams_lets_them_finish_or_end_them_explicitly_within_the_drain(
    emulator: ServerProcess, upstream: EmulatorControl
) -> None:
    """Half the streams finish during the drain; the other half are still running at its deadline and
    end with an in-band error (UI, data) or a dropped connection (text). None ends looking complete."""
    server = start_proxy(emulator.url, BFF_DRAIN_SECONDS=str(DRAIN_SECONDS))
    story = generate_text("wf_story", {"message": "fractions"})
    # Finishers wait after their first chunk until released, then send the rest at once; stragglers
    # send one chunk every 30 seconds, so the drain deadline finds them running.
    upstream.fault(op="stream", workflow="wf_story", hold_after=1, delay=0, times=OPEN_STREAMS // 2)
    upstream.fault(op="stream", workflow="wf_tutor", delay=30, times=OPEN_STREAMS // 2)
    plan = [(alias, PROTOCOLS[n % 3]) for n in range(OPEN_STREAMS // 2) for alias in ("story", "tutor")]
    first_chunks = threading.Semaphore(0)
    try:
        with browser(server.url) as client, ThreadPoolExecutor(OPEN_STREAMS) as pool:
            client.post("/auth/guest").raise_for_status()
            pending = [
                pool.submit(
                    _stream_until_the_end,
                    client,
                    path_for(protocol).replace("tutor", alias),
                    # A chat of its own each: a new message in a chat would end the chat's answer.
                    body_for(protocol) if protocol == "text" else {**REQUEST, "id": f"chat-{n}"},
                    first_chunks,
                )
                for n, (alias, protocol) in enumerate(plan)
            ]
            for _ in plan:  # every stream is open and has relayed its first chunk
                assert first_chunks.acquire(timeout=30)

            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log(lambda e: e.get("message") == "draining")
            upstream.release()  # the finishers finish, inside the drain
            outcomes = [future.result(timeout=60) for future in pending]
        exit_code = server.process.wait(60)
    finally:
        server.stop()

    for (alias, protocol), (outcome, received) in zip(plan, outcomes, strict=True):
        text = received.decode()
        expected = story if alias == "story" else CHUNKS[0]
        if protocol == "text":
            assert (outcome, text) == (("complete", story) if alias == "story" else ("broken", expected))
        elif protocol == "ui":
            events = sse_events(text)
            assert outcome == "complete" and text_of(events) == expected
            ending = {"type": "finish"} if alias == "story" else {"type": "error", "errorText": RESTARTING}
            assert events[-2:] == [ending, "[DONE]"]
        else:
            parts = data_parts(text)
            assert outcome == "complete" and "".join(v for code, v in parts if code == "0") == expected
            assert parts[-1] == (("d", {"finishReason": "stop"}) if alias == "story" else ("3", RESTARTING))

    # A clean shutdown: uvicorn finishes, then re-raises the SIGTERM it caught, as a process should.
    assert exit_code == -signal.SIGTERM
    assert any(e.get("message", "").startswith("Finished server process") for e in server.log_entries())
    deadline = next(e for e in server.log_entries() if e.get("message") == "drain deadline passed")
    assert deadline["relays_ended"] == OPEN_STREAMS // 2
    ends = [line["end"] for line in request_lines(server) if line["route"] != "/auth/guest"]
    assert sorted(ends) == ["complete"] * (OPEN_STREAMS // 2) + ["shutdown"] * (OPEN_STREAMS // 2)
    # uvicorn's own graceful-shutdown timeout never had to cancel anything: every stream had ended.
    assert not [e for e in server.log_entries() if "graceful shutdown exceeded" in e.get("message", "")]
    reasons = [event["reason"] for event in upstream.wait(count=OPEN_STREAMS, kind="stream_end")]
    assert sorted(reasons) == ["cancelled"] * (OPEN_STREAMS // 2) + ["complete"] * (OPEN_STREAMS // 2)


@pytest.mark.parametrize("path", ["/api/workflows/tutor/stream", "/api/workflows/tutor/run"])
def test_a_relay_still_being_admitted_at_the_drain_deadline_is_ended_at_once(
    emulator: ServerProcess, upstream: EmulatorControl, path: str
) -> None:
    """The deadline ends the relays running then; one whose body was still arriving registers after
    it, and must end too, with the same 503, rather than run on until uvicorn's own timeout."""
    server = start_proxy(emulator.url, BFF_DRAIN_SECONDS="1")
    try:
        with browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()

            def body() -> Iterator[bytes]:
                yield b'{"topic": '
                assert server.process is not None
                server.process.send_signal(signal.SIGTERM)
                server.wait_for_log(lambda e: e.get("message") == "drain deadline passed")
                yield b'"late"}'

            response = client.post(path, content=body(), headers={"Content-Type": "application/json"})
    finally:
        server.stop()

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert upstream.requests() == []  # nothing minted, nothing run
