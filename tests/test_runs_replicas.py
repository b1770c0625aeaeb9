"""Runs across replicas (CONTRACT C1): two `python -m proxy serve` processes share a real `redis-server`.

A run lives on the replica holding its upstream connection; a follower or a stop may arrive at
either. The test plays the balancer, sending one browser's requests to either replica.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import INTERRUPTED
from tests.servers import EmulatorControl, RedisServer, ServerProcess, browser, eventually, replicas_of, start_proxy
from tests.test_chat_protocols import sse_events, text_of

INPUTS = {"message": "fractions"}
EXPECTED = generate_text("wf_tutor", INPUTS)
CHUNKS = split_chunks(EXPECTED)
LEASE_SECONDS = 3
GRACE_SECONDS = 2


def chat_body(chat_id: str) -> dict[str, Any]:
    return {"id": chat_id, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "fractions"}]}]}


def replica_env(redis: RedisServer, **overrides: str) -> dict[str, str]:
    return {
        "BFF_STORAGE_URL": redis.url,
        "BFF_STREAM_LEASE_SECONDS": str(LEASE_SECONDS),
        "BFF_RESUME_GRACE_SECONDS": str(GRACE_SECONDS),
        "BFF_MAX_CONCURRENT_STREAMS": "1",
        "BFF_DAILY_OUTPUT_CHARS": "1000000",
        **overrides,
    }


@pytest.fixture(scope="module")
def replicas(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with replicas_of(emulator.url, **replica_env(redis_server)) as (first, second):
        yield first, second


@pytest.fixture
def browsers(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """One signed-in browser, as seen by each replica (the same cookie)."""
    first, second = replicas
    with browser(first.url) as on_first:
        on_first.post("/auth/guest").raise_for_status()
        with browser(second.url, cookies=on_first.cookies) as on_second:
            yield on_first, on_second


def test_a_chat_started_on_one_replica_resumes_on_the_other(
    browsers: tuple[httpx.Client, httpx.Client], upstream: EmulatorControl
) -> None:
    on_first, on_second = browsers
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with on_first.stream("POST", "/api/chat/tutor", json=chat_body("moves")) as response:
        head = b""
        body = response.iter_raw()
        while b"text-delta" not in head:
            head += next(body)
    message_id = sse_events(head.decode()[: head.decode().rindex("\n\n") + 2])[0]["messageId"]

    with on_second.stream("GET", "/api/chat/tutor/moves/stream") as resumed:
        assert resumed.status_code == 200
        upstream.release()
        events = sse_events(resumed.read().decode())

    assert events[0] == {"type": "start", "messageId": message_id}
    assert text_of(events) == EXPECTED
    assert events[-2:] == [{"type": "finish"}, "[DONE]"]
    assert len(upstream.requests("stream")) == 1


def test_a_stop_sent_to_the_other_replica_ends_the_run_where_it_runs(
    browsers: tuple[httpx.Client, httpx.Client], upstream: EmulatorControl
) -> None:
    on_first, on_second = browsers
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with on_first.stream("POST", "/api/chat/tutor", json=chat_body("halt")) as response:
        body = response.iter_raw()
        received = next(body)
        assert on_second.post("/api/chat/tutor/halt/stop").status_code == 204
        received += b"".join(body)

    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"
    events = sse_events(received.decode())
    assert text_of(events) == CHUNKS[0]
    assert events[-2:] == [{"type": "finish"}, "[DONE]"]
    # The slot comes back: the user's one stream is free again, on either replica. Followers hear the
    # end before the run releases its slot, so the first try may still find it taken.
    upstream.reset()

    def relayed() -> str | None:
        answer = on_second.post("/api/workflows/tutor/stream", json=INPUTS)
        return answer.text if answer.status_code != 429 else None

    assert eventually(relayed, "the stream slot released") == EXPECTED


def test_a_follower_on_the_other_replica_keeps_the_run_going_past_the_grace(
    browsers: tuple[httpx.Client, httpx.Client], upstream: EmulatorControl
) -> None:
    on_first, on_second = browsers
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with on_first.stream("POST", "/api/workflows/tutor/stream", json=INPUTS) as response:
        run_id = response.headers["x-run-id"]
        next(response.iter_raw())
    # Nobody follows it on the first replica now; the second replica's follower must count there.
    with on_second.stream("GET", f"/api/runs/{run_id}/stream") as resumed:
        body = resumed.iter_raw()
        assert next(body) == CHUNKS[0].encode()
        time.sleep(2.5 * GRACE_SECONDS)  # the grace passes, more than twice over: time is the point here
        assert upstream.events(kind="stream_end") == []
        upstream.release()
        rest = b"".join(body)
    assert (CHUNKS[0].encode() + rest).decode() == EXPECTED


def test_one_run_with_followers_on_both_replicas_is_charged_once_and_holds_one_slot(
    browsers: tuple[httpx.Client, httpx.Client], upstream: EmulatorControl
) -> None:
    on_first, on_second = browsers
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with on_first.stream("POST", "/api/chat/tutor", json=chat_body("shared")) as origin:
        origin_body = origin.iter_raw()
        head = next(origin_body)
        with on_second.stream("GET", "/api/chat/tutor/shared/stream?protocol=text") as other:
            assert other.status_code == 200
            refused = on_second.post("/api/workflows/tutor/stream", json=INPUTS)
            upstream.release()
            followed = other.read().decode()
        answered = text_of(sse_events((head + b"".join(origin_body)).decode()))

    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_streams")
    assert answered == followed == EXPECTED

    # The charge is written just after the answer's end: wait for it, then check it is exactly one.
    eventually(lambda: output_used(on_second) > 0, "the run's charge")
    assert output_used(on_first) == output_used(on_second) == len(EXPECTED)


def output_used(client: httpx.Client) -> int:
    used: int = client.get("/auth/session").json()["limits"]["daily_output_chars"]["used"]
    return used


def test_followers_of_a_killed_replica_end_with_an_in_band_error_within_the_lease(
    emulator: ServerProcess,
    redis_server: RedisServer,
    replicas: tuple[ServerProcess, ServerProcess],
    upstream: EmulatorControl,
) -> None:
    _, survivor = replicas
    doomed = start_proxy(emulator.url, **replica_env(redis_server))
    try:
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
        with browser(doomed.url) as on_doomed:
            on_doomed.post("/auth/guest").raise_for_status()
            with (
                browser(survivor.url, cookies=on_doomed.cookies) as on_survivor,
                on_doomed.stream("POST", "/api/chat/tutor", json=chat_body("doomed")) as response,
            ):
                next(response.iter_raw())
                with on_survivor.stream("GET", "/api/chat/tutor/doomed/stream") as follower:
                    body = follower.iter_raw()
                    head = next(body)
                    doomed.stop(signal.SIGKILL)
                    killed_at = time.monotonic()
                    events = sse_events((head + b"".join(body)).decode())
                    ended_after = time.monotonic() - killed_at
    finally:
        doomed.stop(signal.SIGKILL)

    assert text_of(events) == CHUNKS[0]
    assert events[-2:] == [{"type": "error", "errorText": INTERRUPTED}, "[DONE]"]
    assert ended_after < 4 * LEASE_SECONDS  # never a hang: within the lease and a read's block
