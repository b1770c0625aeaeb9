"""Relay mode (CONTRACT B3): `/api/workflows/{alias}/stream` and `/run` over live servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from tests.servers import TEST_API_KEY, EmulatorControl, ServerProcess, browser, start_proxy

STREAM = "/api/workflows/tutor/stream"
INPUTS = {"message": "fractions"}
EXPECTED = generate_text("wf_tutor", INPUTS)


def test_the_relay_streams_the_upstream_answer_byte_for_byte(guest: httpx.Client) -> None:
    response = guest.post(STREAM, json=INPUTS)

    assert response.status_code == 200
    assert response.text == EXPECTED
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache, no-transform"


def test_the_relay_passes_each_chunk_on_before_the_upstream_has_finished(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    chunks = split_chunks(EXPECTED)

    with guest.stream("POST", STREAM, json=INPUTS) as response:
        body = response.iter_raw()
        first = next(body)
        # The upstream is holding its second chunk until released: it has not finished yet.
        assert first == chunks[0].encode()
        assert upstream.events(kind="stream_end") == []
        upstream.release()
        rest = b"".join(body)

    assert (first + rest).decode() == EXPECTED
    upstream.wait(kind="stream_end", reason="complete")


def test_only_the_inputs_reach_the_upstream_and_the_key_only_on_the_mint(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    guest.post(STREAM, json=INPUTS, headers={"Authorization": "Bearer browser-secret", "X-Extra": "1"})

    [mint] = upstream.requests("mint")
    [stream] = upstream.requests("stream")
    assert mint["headers"]["authorization"] == f"Bearer {TEST_API_KEY}"
    assert stream["body"] == INPUTS
    assert set(stream["query"]) == {"token"}
    for request in (mint, stream):
        forwarded = set(request["headers"])
        assert not forwarded & {"cookie", "x-csrf", "x-extra", "origin"}
        assert "browser-secret" not in str(request)
    assert "authorization" not in stream["headers"]


def test_run_returns_the_whole_answer_with_citations(guest: httpx.Client, upstream: EmulatorControl) -> None:
    response = guest.post("/api/workflows/story/run", json={"topic": "dragons"})

    assert response.status_code == 200
    assert response.json() == {
        "result": generate_text("wf_story", {"topic": "dragons"}),
        "citations": ["https://example.org/sources/wf_story"],
    }
    [run] = upstream.requests("run")
    assert run["headers"]["authorization"] == f"Bearer {TEST_API_KEY}"
    assert run["body"] == {"topic": "dragons"}


def _raw_stream_request(proxy: ServerProcess, cookie: str) -> socket.socket:
    """Send a stream request over a bare socket, so the test decides exactly when the client leaves."""
    body = b'{"message": "fractions"}'
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {STREAM} HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\nCookie: bff_session={cookie}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def test_a_client_leaving_before_the_first_byte_cancels_the_upstream_request(
    proxy: ServerProcess, guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)
    sock = _raw_stream_request(proxy, guest.cookies["bff_session"])
    upstream.wait(kind="stream_start")

    sock.close()

    [ended] = upstream.wait(kind="stream_end")
    assert ended["reason"] == "cancelled"


def test_a_client_leaving_mid_stream_cancels_the_upstream_request(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=2)

    with guest.stream("POST", STREAM, json=INPUTS) as response:
        next(response.iter_raw())

    [ended] = upstream.wait(kind="stream_end")
    assert ended["reason"] == "cancelled"


def test_an_upstream_cut_mid_stream_breaks_the_client_stream_instead_of_ending_it_cleanly(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=3)
    received = b""

    with pytest.raises(httpx.RemoteProtocolError), guest.stream("POST", STREAM, json=INPUTS) as response:
        for chunk in response.iter_raw():
            received += chunk

    assert received.decode() == "".join(split_chunks(EXPECTED)[:3])


@pytest.fixture
def short_deadline_proxy(emulator: ServerProcess) -> Iterator[ServerProcess]:
    server = start_proxy(emulator.url, BFF_MAX_STREAM_SECONDS="1")
    yield server
    server.stop()


def test_a_stream_that_never_starts_ends_at_the_deadline_with_504(
    short_deadline_proxy: ServerProcess, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)
    with browser(short_deadline_proxy.url) as client:
        client.post("/auth/guest").raise_for_status()
        response = client.post(STREAM, json=INPUTS)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"


def test_a_stream_still_running_at_the_deadline_is_cut_off(
    short_deadline_proxy: ServerProcess, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with browser(short_deadline_proxy.url) as client:
        client.post("/auth/guest").raise_for_status()
        with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", STREAM, json=INPUTS) as response:
            response.read()

    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"
    short_deadline_proxy.wait_for_log(lambda e: e.get("message") == "request end" and e.get("end") == "deadline")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"message": 5}}, 422, "invalid_input"),
        ({"json": ["message"]}, 422, "invalid_input"),
        ({"json": {"bad name": "x"}}, 422, "invalid_input"),
        ({"json": {"message": "x" * 16_001}}, 422, "invalid_input"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "invalid_input"),
        (
            {"content": b"message=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            422,
            "invalid_input",
        ),
        ({"json": {"message": "x" * 70_000}}, 413, "body_too_large"),
        ({"json": INPUTS, "headers": {"X-CSRF": "0"}}, 403, "csrf_failed"),
        ({"json": INPUTS, "headers": {"Origin": "https://evil.example"}}, 403, "csrf_failed"),
        ({"json": INPUTS, "headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "csrf_failed"),
    ],
)
def test_bad_requests_are_refused_and_nothing_reaches_the_upstream(
    guest: httpx.Client, upstream: EmulatorControl, kwargs: dict[str, object], status: int, code: str
) -> None:
    response = guest.post(STREAM, **kwargs)  # type: ignore[arg-type]

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert upstream.requests() == []


def test_an_unknown_workflow_is_a_404(guest: httpx.Client, upstream: EmulatorControl) -> None:
    for path in ("/api/workflows/nope/stream", "/api/workflows/nope/run"):
        response = guest.post(path, json=INPUTS)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_workflow"
    assert upstream.requests() == []


def test_relaying_needs_a_session(anonymous: httpx.Client, upstream: EmulatorControl) -> None:
    for path in (STREAM, "/api/workflows/tutor/run"):
        response = anonymous.post(path, json=INPUTS)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
    assert upstream.requests() == []


def test_the_request_id_is_echoed_and_forwarded_upstream(guest: httpx.Client, upstream: EmulatorControl) -> None:
    offered = guest.post(STREAM, json=INPUTS, headers={"X-Request-ID": "trace-123"})
    generated = guest.post("/api/workflows/story/run", json={"topic": "x"}, headers={"X-Request-ID": "bad id!"})

    assert offered.headers["x-request-id"] == "trace-123"
    assert generated.headers["x-request-id"] != "bad id!"
    [mint] = upstream.requests("mint")
    [stream] = upstream.requests("stream")
    [run] = upstream.requests("run")
    assert mint["headers"]["x-request-id"] == stream["headers"]["x-request-id"] == "trace-123"
    assert run["headers"]["x-request-id"] == generated.headers["x-request-id"]
