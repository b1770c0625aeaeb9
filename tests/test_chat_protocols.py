"""The three chat response protocols on the wire: UI message stream (SSE), plain text, v4 data stream.

Over live servers: framing, headers, incremental delivery (the first delta arrives while the upstream
is still holding its answer back), in-band errors, keep-alives, the deadline and client disconnects.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import INTERRUPTED, TOO_LONG
from tests.servers import EmulatorControl, ServerProcess, proxy_with

QUESTION = "fractions"
ANSWER = generate_text("wf_tutor", {"message": QUESTION})
CHUNKS = split_chunks(ANSWER)
REQUEST = {
    "id": "chat-1",
    "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": QUESTION}]}],
    "trigger": "submit-message",
}
NO_CREDITS = "The upstream account has no credits left."


def chat_path(protocol: str) -> str:
    return "/api/chat/tutor" if protocol == "ui" else f"/api/chat/tutor?protocol={protocol}"


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of a complete SSE body; comments (keep-alives) are skipped."""
    assert body.endswith("\n\n"), "every event must be closed by a blank line"
    events: list[Any] = []
    for block in body.split("\n\n")[:-1]:
        data = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append("[DONE]" if data == ["[DONE]"] else json.loads("\n".join(data)))
    return events


def data_parts(body: str) -> list[tuple[str, Any]]:
    """The `CODE:JSON` parts of a v4 data stream; blank lines (keep-alives) are skipped."""
    return [(line[0], json.loads(line[2:])) for line in body.split("\n") if line]


def text_of(events: list[Any]) -> str:
    return "".join(event["delta"] for event in events if isinstance(event, dict) and event["type"] == "text-delta")


def test_the_ui_stream_is_the_minimal_documented_chunk_sequence(guest: httpx.Client) -> None:
    response = guest.post("/api/chat/tutor", json=REQUEST)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    events = sse_events(response.text)
    start, *middle, done = events
    assert start == {"type": "start", "messageId": start["messageId"]}
    assert done == "[DONE]"
    # Only the fields every client since ai 5.0.0 accepts: no finishReason on finish.
    assert middle == [
        {"type": "start-step"},
        {"type": "text-start", "id": "text-0"},
        *({"type": "text-delta", "id": "text-0", "delta": chunk} for chunk in CHUNKS),
        {"type": "text-end", "id": "text-0"},
        {"type": "finish-step"},
        {"type": "finish"},
    ]


def test_every_ui_answer_has_a_fresh_message_id(guest: httpx.Client, upstream: EmulatorControl) -> None:
    upstream.fault(op="stream", chunks=["Hi"], times=3)

    ids = {sse_events(guest.post("/api/chat/tutor", json=REQUEST).text)[0]["messageId"] for _ in range(3)}

    assert len(ids) == 3


def test_the_data_stream_is_ai_sdk_4_text_parts_and_a_finish(guest: httpx.Client) -> None:
    response = guest.post("/api/chat/tutor?protocol=data", json=REQUEST)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["x-vercel-ai-data-stream"] == "v1"
    assert data_parts(response.text) == [*(("0", chunk) for chunk in CHUNKS), ("d", {"finishReason": "stop"})]


def test_the_text_protocol_is_the_answer_byte_for_byte(guest: httpx.Client) -> None:
    response = guest.post("/api/chat/tutor?protocol=text", json=REQUEST)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == ANSWER


@pytest.mark.parametrize("protocol", ["ui", "data"])
def test_characters_split_across_upstream_chunks_arrive_whole(
    guest: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    # "café ✓": the é and the ✓ are each split between two upstream chunks (latin-1 = raw bytes).
    raw = "café ✓".encode()
    upstream.fault(
        op="stream", chunks=[raw[:4].decode("latin-1"), raw[4:9].decode("latin-1"), raw[9:].decode("latin-1")]
    )

    body = guest.post(chat_path(protocol), json=REQUEST).text

    if protocol == "ui":
        deltas = [event["delta"] for event in sse_events(body) if isinstance(event, dict) and "delta" in event]
    else:
        deltas = [value for code, value in data_parts(body) if code == "0"]
    assert "".join(deltas) == "café ✓"
    assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.parametrize("protocol", ["ui", "text", "data"])
def test_the_first_delta_arrives_before_the_upstream_has_finished(
    guest: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)

    with guest.stream("POST", chat_path(protocol), json=REQUEST) as response:
        chunks = response.iter_raw()
        first = next(chunks).decode()
        # The upstream holds everything after its first chunk until released: it has not finished.
        assert CHUNKS[0] in first
        assert upstream.events(kind="stream_end") == []
        upstream.release()
        body = first + b"".join(chunks).decode()

    if protocol == "ui":
        assert text_of(sse_events(body)) == ANSWER
    elif protocol == "data":
        assert "".join(value for code, value in data_parts(body) if code == "0") == ANSWER
    else:
        assert body == ANSWER


def test_an_upstream_cut_becomes_an_in_band_ui_error_after_the_partial_text(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=3)

    response = guest.post("/api/chat/tutor", json=REQUEST)  # a clean close: no exception here

    events = sse_events(response.text)
    assert text_of(events) == "".join(CHUNKS[:3])
    assert events[-2:] == [{"type": "error", "errorText": INTERRUPTED}, "[DONE]"]


def test_an_upstream_cut_becomes_an_in_band_data_stream_error(guest: httpx.Client, upstream: EmulatorControl) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=3)

    parts = data_parts(guest.post("/api/chat/tutor?protocol=data", json=REQUEST).text)

    assert parts == [*(("0", chunk) for chunk in CHUNKS[:3]), ("3", INTERRUPTED)]


def test_an_upstream_cut_breaks_a_text_stream_so_it_never_looks_complete(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=3)

    with pytest.raises(httpx.RemoteProtocolError):
        guest.post("/api/chat/tutor?protocol=text", json=REQUEST)


@pytest.mark.parametrize("protocol", ["ui", "text", "data"])
def test_an_upstream_refusal_before_streaming_is_a_plain_text_status(
    guest: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", status=402)

    response = guest.post(chat_path(protocol), json=REQUEST)

    assert (response.status_code, response.text) == (402, NO_CREDITS)
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("protocol", ["ui", "data"])
def test_a_client_that_stops_mid_stream_cancels_the_upstream(
    guest: httpx.Client, upstream: EmulatorControl, protocol: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)

    with guest.stream("POST", chat_path(protocol), json=REQUEST) as response:
        next(response.iter_raw())

    [ended] = upstream.wait(kind="stream_end")
    assert ended["reason"] == "cancelled"


def test_a_client_that_stops_before_the_first_byte_cancels_the_upstream(
    proxy: ServerProcess, guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)
    body = json.dumps(REQUEST).encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /api/chat/tutor HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\n"
            f"Cookie: bff_session={guest.cookies['bff_session']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        upstream.wait(kind="stream_start")

    [ended] = upstream.wait(kind="stream_end")
    assert ended["reason"] == "cancelled"


@pytest.fixture(scope="module")
def short_deadline(emulator: ServerProcess) -> Iterator[httpx.Client]:
    """A proxy whose streams end after one second: keep-alives then come every quarter second."""
    with proxy_with(emulator.url, BFF_MAX_STREAM_SECONDS="1") as client:
        yield client


def test_a_slow_upstream_gets_keep_alives_then_ends_in_band_at_the_deadline(
    short_deadline: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)

    response = short_deadline.post("/api/chat/tutor", json=REQUEST)

    assert response.status_code == 200
    assert response.text.startswith(": keep-alive\n\n")
    assert sse_events(response.text) == [{"type": "error", "errorText": TOO_LONG}, "[DONE]"]
    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"


def test_a_stream_still_running_at_the_deadline_ends_with_an_error_after_its_text(
    short_deadline: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=2)

    events = sse_events(short_deadline.post("/api/chat/tutor", json=REQUEST).text)

    assert text_of(events) == "".join(CHUNKS[:2])
    assert events[-2:] == [{"type": "error", "errorText": TOO_LONG}, "[DONE]"]
    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"


def test_the_data_stream_keeps_alive_with_blank_lines_and_ends_in_band_at_the_deadline(
    short_deadline: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)

    response = short_deadline.post("/api/chat/tutor?protocol=data", json=REQUEST)

    assert response.status_code == 200
    assert response.text.startswith("\n")
    assert data_parts(response.text) == [("3", TOO_LONG)]


def test_an_upstream_refusal_after_a_keep_alive_is_reported_in_band(
    short_deadline: httpx.Client, upstream: EmulatorControl
) -> None:
    # The upstream answers 402 only once released, after the 200 was committed by a keep-alive.
    upstream.fault(op="stream", workflow="wf_tutor", stall=60, status=402)

    with short_deadline.stream("POST", "/api/chat/tutor", json=REQUEST) as response:
        chunks = response.iter_raw()
        assert next(chunks) == b": keep-alive\n\n"
        upstream.release()
        body = b"".join(chunks).decode()

    assert response.status_code == 200
    assert sse_events(body) == [{"type": "error", "errorText": NO_CREDITS}, "[DONE]"]
