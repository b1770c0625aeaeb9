"""Runs that outlive their connection (CONTRACT C1), over live servers: resume, stop, the grace period,
one slot and one charge per run however many follow it, and clients that never read.

Multi-replica runs are in tests/test_runs_replicas.py; the real AI SDK clients resuming are in
tests/test_chat_node.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import SESSION_ENDED
from tests.servers import EmulatorControl, ServerProcess, browser, guest_of, start_proxy
from tests.test_chat_protocols import sse_events, text_of

STREAM = "/api/workflows/tutor/stream"
INPUTS = {"message": "fractions"}
EXPECTED = generate_text("wf_tutor", INPUTS)
CHUNKS = split_chunks(EXPECTED)
GRACE = "20"


def chat_body(chat_id: str, text: str = "fractions") -> dict[str, Any]:
    return {"id": chat_id, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}]}


@pytest.fixture(scope="module")
def runs_proxy(emulator: ServerProcess) -> Iterator[ServerProcess]:
    """Runs outlive their connection here for 20 s (the default grace period)."""
    server = start_proxy(emulator.url, BFF_RESUME_GRACE_SECONDS=GRACE)
    yield server
    server.stop()


@pytest.fixture
def client(runs_proxy: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    with guest_of(runs_proxy.url) as signed_in:
        yield signed_in


def first_bytes(response: httpx.Response) -> bytes:
    return next(response.iter_raw())


def audit_end(server: ServerProcess, run_id: str) -> dict[str, Any]:
    return server.wait_for_log(lambda e: e.get("audit") == "relay.end" and e.get("run_id") == run_id)


# Every relay is a run


def test_every_relay_response_names_its_run(client: httpx.Client) -> None:
    responses = [
        client.post(STREAM, json=INPUTS),
        client.post("/api/workflows/tutor/run", json=INPUTS),
        client.post("/api/chat/tutor", json=chat_body("named")),
    ]
    ids = [response.headers["x-run-id"] for response in responses]
    assert all(response.status_code == 200 for response in responses)
    assert len(set(ids)) == 3
    assert all(run_id.startswith("run_") for run_id in ids)


# Resume


def test_a_plain_text_stream_cut_mid_answer_continues_from_the_character_it_reached(
    runs_proxy: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", STREAM, json=INPUTS) as response:
        run_id = response.headers["x-run-id"]
        received = first_bytes(response).decode()
    upstream.release()

    rest = client.get(f"/api/runs/{run_id}/stream", params={"from": len(received)})

    assert rest.status_code == 200
    assert rest.headers["content-type"] == "text/plain; charset=utf-8"
    assert received + rest.text == EXPECTED
    assert len(upstream.requests("stream")) == 1  # the same run, not a second one
    assert audit_end(runs_proxy, run_id)["end"] == "complete"


def test_from_n_counts_characters_not_bytes(client: httpx.Client, upstream: EmulatorControl) -> None:
    answer = ["Ça ", "coûte ", "5 €"]
    # The emulator sends each code point of a chunk as one byte: these are the UTF-8 bytes.
    upstream.fault(op="stream", workflow="wf_tutor", chunks=[chunk.encode().decode("latin-1") for chunk in answer])
    run_id = client.post(STREAM, json=INPUTS).headers["x-run-id"]

    assert client.get(f"/api/runs/{run_id}/stream", params={"from": 4}).text == "".join(answer)[4:]
    assert client.get(f"/api/runs/{run_id}/stream", params={"from": 1000}).text == ""


def test_a_chat_answer_resumes_from_its_first_chunk_with_the_same_message_id(
    client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", "/api/chat/tutor", json=chat_body("reload-me")) as response:
        assert response.status_code == 200
        head = b""
        while b"text-delta" not in head:
            head += first_bytes(response)
    original = sse_events(head.decode()[: head.decode().rindex("\n\n") + 2])
    upstream.release()

    resumed = client.get("/api/chat/tutor/reload-me/stream")

    assert resumed.status_code == 200
    assert resumed.headers["content-type"] == "text/event-stream"
    assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
    events = sse_events(resumed.text)
    assert events[0] == original[0] == {"type": "start", "messageId": original[0]["messageId"]}
    assert text_of(events) == EXPECTED
    assert events[-2:] == [{"type": "finish"}, "[DONE]"]
    assert len(upstream.requests("stream")) == 1


def test_a_finished_answer_can_still_be_resumed_as_text_or_in_the_v4_data_protocol(client: httpx.Client) -> None:
    client.post("/api/chat/tutor", json=chat_body("done-chat")).raise_for_status()

    assert client.get("/api/chat/tutor/done-chat/stream", params={"protocol": "text"}).text == EXPECTED
    v4 = client.get("/api/chat/tutor", params={"chatId": "done-chat"})
    assert v4.status_code == 200
    assert v4.headers["x-vercel-ai-data-stream"] == "v1"
    lines = [line for line in v4.text.split("\n") if line]
    assert "".join(json.loads(line[2:]) for line in lines if line.startswith("0:")) == EXPECTED
    assert lines[-1] == 'd:{"finishReason":"stop"}'


def test_resume_reveals_nothing_without_a_run_a_session_or_the_chats_owner(
    runs_proxy: ServerProcess, client: httpx.Client
) -> None:
    client.post("/api/chat/tutor", json=chat_body("mine")).raise_for_status()
    with guest_of(runs_proxy.url) as stranger, browser(runs_proxy.url) as anonymous:
        for who, path in [
            (client, "/api/chat/tutor/never-ran/stream"),
            (client, "/api/chat/story/mine/stream"),  # the same chat id under another workflow
            (client, "/api/chat/nope/mine/stream"),
            (stranger, "/api/chat/tutor/mine/stream"),
            (anonymous, "/api/chat/tutor/mine/stream"),
        ]:
            response = who.get(path)
            assert (response.status_code, response.content) == (204, b""), path
        for who in (stranger, anonymous):  # AI SDK 4 takes a 204 for an error: an empty data stream
            v4 = who.get("/api/chat/tutor", params={"chatId": "mine"})
            assert (v4.status_code, v4.content) == (200, b"")


def test_a_run_id_is_its_owners_alone(runs_proxy: ServerProcess, client: httpx.Client) -> None:
    run_id = client.post(STREAM, json=INPUTS).headers["x-run-id"]
    with guest_of(runs_proxy.url) as stranger, browser(runs_proxy.url) as anonymous:
        for path in (f"/api/runs/{run_id}/stream", "/api/runs/run_unknown/stream"):
            response = stranger.get(path)
            assert (response.status_code, response.json()["error"]["code"]) == (404, "unknown_run")
        response = stranger.post(f"/api/runs/{run_id}/stop")
        assert (response.status_code, response.json()["error"]["code"]) == (404, "unknown_run")
        assert anonymous.get(f"/api/runs/{run_id}/stream").status_code == 401
    bad = client.get(f"/api/runs/{run_id}/stream", params={"from": "-1"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_input")


# Stop


def test_the_chat_stop_route_ends_the_run_upstream_and_its_followers_cleanly(
    runs_proxy: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", "/api/chat/tutor", json=chat_body("to-stop")) as response:
        run_id = response.headers["x-run-id"]
        body = response.iter_raw()
        received = next(body)
        with client.stream("GET", "/api/chat/tutor/to-stop/stream") as other:
            assert other.status_code == 200
            stopped = client.post("/api/chat/tutor/to-stop/stop")
            assert stopped.status_code == 204
            followed = other.read()
        received += b"".join(body)

    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"
    for stream in (received, followed):
        events = sse_events(stream.decode())
        assert text_of(events) == CHUNKS[0]
        assert events[-2:] == [{"type": "finish"}, "[DONE]"]
    assert audit_end(runs_proxy, run_id)["end"] == "stopped"


def test_the_run_stop_route_ends_a_plain_text_stream_with_what_it_had(
    client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", STREAM, json=INPUTS) as response:
        body = response.iter_raw()
        received = next(body)
        assert client.post(f"/api/runs/{response.headers['x-run-id']}/stop").status_code == 204
        received += b"".join(body)

    assert received.decode() == CHUNKS[0]
    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"


def test_stopping_needs_the_csrf_header_and_a_chat_without_a_run_is_already_stopped(
    runs_proxy: ServerProcess, client: httpx.Client
) -> None:
    refused = client.post("/api/chat/tutor/any/stop", headers={"X-CSRF": "0"})
    assert (refused.status_code, refused.headers["x-error-code"]) == (403, "csrf_failed")
    assert client.post("/api/chat/tutor/never-ran/stop").status_code == 204
    with browser(runs_proxy.url) as anonymous:
        assert anonymous.post("/api/chat/tutor/any/stop").status_code == 401


def test_a_new_message_in_the_chat_ends_the_previous_answer(
    runs_proxy: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", "/api/chat/tutor", json=chat_body("busy")) as first:
        first_id = first.headers["x-run-id"]
        body = first.iter_raw()
        received = next(body)
        second = client.post("/api/chat/tutor", json=chat_body("busy", "another question"))
        received += b"".join(body)

    assert text_of(sse_events(second.text)) == generate_text("wf_tutor", {"message": "another question"})
    assert sse_events(received.decode())[-2:] == [{"type": "finish"}, "[DONE]"]
    assert audit_end(runs_proxy, first_id)["end"] == "replaced"
    assert client.get("/api/chat/tutor/busy/stream").headers["x-run-id"] == second.headers["x-run-id"]


# The grace period


def test_a_client_that_comes_back_within_the_grace_gets_the_whole_answer(
    client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", STREAM, json=INPUTS) as response:
        run_id = response.headers["x-run-id"]
        first_bytes(response)
    # The client is gone; the upstream is still streaming for the run, nobody cancelled it.
    with client.stream("GET", f"/api/runs/{run_id}/stream") as resumed:
        assert upstream.events(kind="stream_end") == []
        upstream.release()
        assert resumed.read().decode() == EXPECTED


def test_a_client_that_never_comes_back_costs_the_grace_and_no_more(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_RESUME_GRACE_SECONDS="1")
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        control.fault(op="stream", workflow="wf_tutor", hold_after=1)
        with guest_of(server.url) as client:
            with client.stream("POST", STREAM, json=INPUTS) as response:
                run_id = response.headers["x-run-id"]
                first_bytes(response)
            left_at = time.monotonic()
            assert control.wait(kind="stream_end", timeout=15)[0]["reason"] == "cancelled"
            waited = time.monotonic() - left_at
        end = audit_end(server, run_id)
    finally:
        server.stop()
        control.reset()
    assert end["end"] == "client_gone"
    assert waited >= 0.9  # it waited for the grace before cancelling, rather than at once


# One slot and one charge per run


def test_three_followers_share_one_slot_and_the_answer_is_charged_once(emulator: ServerProcess) -> None:
    server = start_proxy(
        emulator.url,
        BFF_RESUME_GRACE_SECONDS=GRACE,
        BFF_MAX_CONCURRENT_STREAMS="1",
        BFF_DAILY_OUTPUT_CHARS="1000000",
    )
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        control.fault(op="stream", workflow="wf_tutor", hold_after=1)
        with guest_of(server.url) as client, client.stream("POST", "/api/chat/tutor", json=chat_body("c")) as origin:
            run_id = origin.headers["x-run-id"]
            origin_body = origin.iter_raw()
            head = next(origin_body)
            with (
                client.stream("GET", "/api/chat/tutor/c/stream") as second,
                client.stream("GET", f"/api/runs/{run_id}/stream") as third,
            ):
                assert (second.status_code, third.status_code) == (200, 200)
                refused = client.post(STREAM, json=INPUTS)  # the run holds the user's one slot
                control.release()
                chats = [
                    text_of(sse_events((head + b"".join(origin_body)).decode())),
                    text_of(sse_events(second.read().decode())),
                ]
                plain = third.read().decode()
            assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_streams")
            assert chats == [EXPECTED, EXPECTED]
            assert plain == EXPECTED
            audit_end(server, run_id)
            used = client.get("/auth/session").json()["limits"]["daily_output_chars"]["used"]
            assert client.post(STREAM, json=INPUTS).status_code == 200  # the slot is free again
    finally:
        server.stop()
        control.reset()
    assert used == len(EXPECTED)


# Clients that never read


def _never_reading(server: ServerProcess, cookie: str, path: str, body: dict[str, Any]) -> socket.socket:
    """A request from a socket with a tiny receive window that then never reads a byte."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\nCookie: bff_session={cookie}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


# A big answer that fills every buffer between the run and the client, then an upstream that holds.
BIG_CHUNKS = ["x" * 65536] * 48


@pytest.mark.parametrize(
    ("path", "body"),
    [(STREAM, INPUTS), ("/api/chat/tutor", chat_body("slow")), ("/api/chat/tutor?protocol=data", chat_body("slow4"))],
    ids=["text", "ui", "data"],
)
def test_a_client_that_never_reads_cannot_hold_its_run_past_the_deadline(
    emulator: ServerProcess, path: str, body: dict[str, Any]
) -> None:
    server = start_proxy(
        emulator.url,
        BFF_MAX_STREAM_SECONDS="2",
        BFF_MAX_CONCURRENT_STREAMS="1",
        BFF_MAX_ANSWER_BYTES=str(16 * 1024 * 1024),
    )
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        control.fault(op="stream", workflow="wf_tutor", chunks=BIG_CHUNKS, hold_after=len(BIG_CHUNKS) - 1, delay=0)
        with guest_of(server.url) as client, guest_of(server.url) as other_user:
            sock = _never_reading(server, client.cookies["bff_session"], path, body)
            try:
                # The run ends at its deadline although its client still holds the socket, unread.
                assert control.wait(kind="stream_end", timeout=15)[0]["reason"] == "cancelled"
                ended = server.wait_for_log(lambda e: e.get("audit") == "relay.end")
                assert ended["end"] == "deadline"
                # Its slot is free: the same user streams again, and so does everyone else.
                control.reset()
                assert client.post(STREAM, json=INPUTS).text == EXPECTED
                assert other_user.post(STREAM, json=INPUTS).text == EXPECTED
            finally:
                sock.close()
    finally:
        server.stop()
        control.reset()


def test_a_client_that_never_reads_loses_its_run_at_logout(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_MAX_CONCURRENT_STREAMS="1", BFF_MAX_ANSWER_BYTES=str(16 * 1024 * 1024))
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        control.fault(op="stream", workflow="wf_tutor", chunks=BIG_CHUNKS, hold_after=len(BIG_CHUNKS) - 1, delay=0)
        with guest_of(server.url) as client:
            sock = _never_reading(server, client.cookies["bff_session"], "/api/chat/tutor", chat_body("x"))
            try:
                control.wait(kind="stream_start")
                server.wait_for_log(lambda e: e.get("audit") == "relay.start")
                assert client.post("/auth/logout").status_code == 204
                assert control.wait(kind="stream_end", timeout=15)[0]["reason"] == "cancelled"
                assert server.wait_for_log(lambda e: e.get("audit") == "relay.end")["end"] == "revoked"
            finally:
                sock.close()
    finally:
        server.stop()
        control.reset()


def test_a_follower_too_slow_for_the_send_timeout_is_dropped_and_the_run_goes_on(emulator: ServerProcess) -> None:
    server = start_proxy(
        emulator.url,
        BFF_SEND_TIMEOUT_SECONDS="1",
        BFF_RESUME_GRACE_SECONDS=GRACE,
        BFF_MAX_ANSWER_BYTES=str(16 * 1024 * 1024),
    )
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        control.fault(op="stream", workflow="wf_tutor", chunks=BIG_CHUNKS, hold_after=len(BIG_CHUNKS) - 1, delay=0)
        with guest_of(server.url) as client:
            sock = _never_reading(server, client.cookies["bff_session"], STREAM, INPUTS)
            try:
                dropped = server.wait_for_log(lambda e: e.get("message") == "request end" and e.get("relay"), 15)
                assert dropped["end"] == "send_timeout"
                assert control.events(kind="stream_end") == []  # the run did not notice
                control.release()
                resumed = client.get(f"/api/runs/{dropped['run_id']}/stream")
                assert resumed.content == "".join(BIG_CHUNKS).encode()
            finally:
                sock.close()
    finally:
        server.stop()
        control.reset()


def test_a_session_ended_mid_run_tells_every_follower_in_band(
    runs_proxy: ServerProcess, client: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", "/api/chat/tutor", json=chat_body("ends")) as response:
        body = response.iter_raw()
        head = next(body)
        with browser(runs_proxy.url, cookies=client.cookies) as same_browser:
            same_browser.post("/auth/logout").raise_for_status()
        events = sse_events((head + b"".join(body)).decode())
    assert events[-2:] == [{"type": "error", "errorText": SESSION_ENDED}, "[DONE]"]


def test_a_client_that_leaves_during_a_burst_stops_the_reading_at_once(emulator: ServerProcess) -> None:
    """The upstream sends back to back, faster than anyone reads: leaving must still end the run then,
    not after the burst, and charge what was relayed, not the whole answer."""
    server = start_proxy(emulator.url, BFF_DAILY_OUTPUT_CHARS="1000000000", BFF_MAX_ANSWER_BYTES=str(256 * 1024 * 1024))
    control = EmulatorControl(emulator.url)
    control.reset()
    burst = ["y" * 65536] * 800  # 50 MiB, no pause between chunks: more than is read before leaving
    try:
        control.fault(op="stream", workflow="wf_tutor", chunks=burst, delay=0)
        with guest_of(server.url) as client:
            with client.stream("POST", STREAM, json=INPUTS) as response:
                first_bytes(response)
            ended = server.wait_for_log(lambda e: e.get("audit") == "relay.end", 15)
            used = client.get("/auth/session").json()["limits"]["daily_output_chars"]["used"]
    finally:
        server.stop()
        control.reset()
    assert ended["end"] == "client_gone"
    assert ended["chars"] < len(burst) * 65536
    assert used == ended["chars"]


def test_a_run_answer_larger_than_the_cap_is_refused_as_too_large(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_MAX_ANSWER_BYTES="65536")
    control = EmulatorControl(emulator.url)
    control.reset()
    try:
        with guest_of(server.url) as client:
            control.fault(op="run", result_chars=60_000)
            fits = client.post("/api/workflows/tutor/run", json=INPUTS)
            control.fault(op="run", result_chars=8 * 1024 * 1024)
            refused = client.post("/api/workflows/tutor/run", json=INPUTS)
    finally:
        server.stop()
        control.reset()
    assert (fits.status_code, len(fits.json()["result"])) == (200, 60_000)
    assert (refused.status_code, refused.json()["error"]["code"]) == (502, "answer_too_large")
