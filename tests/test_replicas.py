"""Several replicas, one Redis (issue 5): every promise holds whichever replica answers.

Two `python -m proxy serve` processes share a real `redis-server` and the emulated upstream, as two
pods behind a balancer would; the test plays the balancer, sending one user's requests to either.
Each test signs in fresh guests, so the per-user state it counts starts at zero.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from proxy.budget import BATCH_CHARS
from proxy.emulator import generate_text
from proxy.slots import StreamSlots
from proxy.storage import RedisStorage
from tests.servers import (
    SESSION_SECRET,
    EmulatorControl,
    RedisServer,
    ServerProcess,
    browser,
    eventually,
    replicas_of,
    start_proxy,
)

STREAM = "/api/workflows/tutor/stream"
INPUTS = {"message": "fractions"}
EXPECTED = generate_text("wf_tutor", INPUTS)
COOKIE = "bff_session"  # BFF_COOKIE_SECURE=false in the test proxies

MINTS_PER_MINUTE = 3
RELAYS_PER_MINUTE = 8
CAP = 2
LEASE_SECONDS = 2
DAILY_OUTPUT_CHARS = 100_000
# Generous bounds for things that happen by themselves (a charge written after the answer ended, a
# dead replica's lease lapsing): the tests wait for them, and fail only if they never come.
EVENTUALLY_SECONDS = 10.0
LEASE_LAPSE_BOUND = 10 * LEASE_SECONDS
POLL_SECONDS = 0.05


def replica_env(redis: RedisServer) -> dict[str, str]:
    return {
        "BFF_STORAGE_URL": redis.url,
        # login is counted per client IP, and every test signs in from 127.0.0.1.
        "BFF_RATE_LIMITS": f"mint={MINTS_PER_MINUTE}/minute;relay={RELAYS_PER_MINUTE}/minute;login=10000/minute",
        "BFF_MAX_CONCURRENT_STREAMS": str(CAP),
        "BFF_STREAM_LEASE_SECONDS": str(LEASE_SECONDS),
        "BFF_DAILY_OUTPUT_CHARS": str(DAILY_OUTPUT_CHARS),
    }


@pytest.fixture(scope="module")
def replicas(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with replicas_of(emulator.url, **replica_env(redis_server)) as (first, second):
        yield first, second


@contextmanager
def signed_in(replica: ServerProcess) -> Iterator[httpx.Client]:
    with browser(replica.url) as client:
        client.post("/auth/guest").raise_for_status()
        yield client


@contextmanager
def same_browser(replica: ServerProcess, client: httpx.Client) -> Iterator[httpx.Client]:
    """The same browser (the same cookie), its request sent by the balancer to another replica."""
    with browser(replica.url, cookies=client.cookies) as other:
        yield other


@contextmanager
def with_cookie(replica: ServerProcess, value: str) -> Iterator[httpx.Client]:
    with browser(replica.url, cookies={COOKIE: value}) as client:
        yield client


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == code
    assert int(response.headers["retry-after"]) >= 1


def stream_admitted(client: httpx.Client) -> Callable[[], httpx.Response | None]:
    """A check for `eventually`: a stream request, or None while it is refused for a full cap."""

    def attempt() -> httpx.Response | None:
        response = client.post(STREAM, json=INPUTS)
        if response.status_code == 429 and response.json()["error"]["code"] == "too_many_streams":
            return None
        return response

    return attempt


def started(response: httpx.Response) -> Iterator[bytes]:
    """Check a stream was admitted and its first chunk arrived; returns the rest of its body.

    Keep what this returns while the stream should stay open: a dropped body iterator closes the
    connection, which the proxy (rightly) takes for a browser that left.
    """
    assert response.status_code == 200
    body = response.iter_raw()
    assert next(body)
    return body


def output_budget(client: httpx.Client) -> dict[str, int]:
    budget: dict[str, int] = client.get("/auth/session").json()["limits"]["daily_output_chars"]
    return budget


def held_slots(redis: RedisServer, user_id: str) -> int:
    """The user's stream slots held right now, as every replica sees them in Redis."""

    async def count() -> int:
        storage = RedisStorage(redis.url)
        try:
            return await StreamSlots(storage, CAP).open(user_id)
        finally:
            await storage.close()

    return asyncio.run(count())


def user_id_of(client: httpx.Client) -> str:
    user_id: str = client.get("/auth/session").json()["user"]["id"]
    return user_id


# Rate limits


@pytest.mark.parametrize(
    ("path", "body", "allowed"),
    [
        ("/api/token", {"workflow": "tutor"}, MINTS_PER_MINUTE),
        ("/api/workflows/tutor/run", INPUTS, RELAYS_PER_MINUTE),
    ],
    ids=["mint", "relay"],
)
def test_a_users_rate_limit_is_one_count_across_the_replicas(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl, path: str, body: object, allowed: int
) -> None:
    first, second = replicas
    with signed_in(first) as on_first, same_browser(second, on_first) as on_second:
        alternating = [(on_first, on_second)[n % 2] for n in range(allowed)]
        answers = [client.post(path, json=body) for client in alternating]
        over = [client.post(path, json=body) for client in (on_first, on_second)]

    assert [a.status_code for a in answers] == [200] * allowed
    assert [int(a.headers["x-ratelimit-remaining"]) for a in answers] == list(reversed(range(allowed)))
    for refused in over:  # the N+1th is refused whichever replica gets it
        assert_refused(refused, "rate_limited")
        assert refused.headers["x-ratelimit-limit"] == str(allowed)
        assert refused.headers["x-ratelimit-remaining"] == "0"
    assert len(upstream.requests("mint" if path == "/api/token" else "run")) == allowed


def test_another_user_keeps_a_rate_limit_of_their_own(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    first, second = replicas
    with signed_in(first) as alice, signed_in(second) as bob:
        for _ in range(MINTS_PER_MINUTE + 1):
            alice.post("/api/token", json={"workflow": "tutor"})

        assert bob.post("/api/token", json={"workflow": "tutor"}).status_code == 200


# Concurrent streams


def test_the_concurrent_stream_cap_holds_across_replicas(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, times=CAP)
    with signed_in(first) as on_first, same_browser(second, on_first) as on_second, ExitStack() as held:
        running = [held.enter_context(client.stream("POST", STREAM, json=INPUTS)) for client in (on_first, on_second)]
        bodies = [started(response) for response in running]  # streaming, one on each replica, held open

        for client in (on_first, on_second):
            assert_refused(client.post(STREAM, json=INPUTS), "too_many_streams")
        assert len(upstream.requests("stream")) == CAP  # the refused ones never reached the upstream

        running[0].close()  # the browser leaves the stream on the first replica: its slot comes back
        admitted = eventually(stream_admitted(on_second), "a stream admitted once one of the two ended")

        assert admitted.status_code == 200
        assert admitted.text == EXPECTED
        upstream.release()
        assert EXPECTED.encode().endswith(b"".join(bodies[1]))  # the other held stream, undisturbed


def test_a_burst_on_both_replicas_at_once_is_admitted_exactly_up_to_the_cap_and_counted_exactly(
    redis_server: RedisServer, replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, times=CAP)
    release = threading.Event()

    def attempt(client: httpx.Client) -> str:
        with client.stream("POST", STREAM, json=INPUTS) as response:
            if response.status_code != 200:
                response.read()
                return str(response.json()["error"]["code"])
            body = response.iter_raw()
            assert next(body)
            release.wait(EVENTUALLY_SECONDS)  # held open until every other attempt has its answer
            b"".join(body)
            return "admitted"

    with (
        signed_in(first) as on_first,
        same_browser(second, on_first) as on_second,
        ThreadPoolExecutor(3 * CAP) as pool,
    ):
        attempts = [pool.submit(attempt, client) for client in [on_first, on_second] * (3 * CAP // 2)]
        eventually(lambda: sum(a.done() for a in attempts) == len(attempts) - CAP, "every refusal answered")
        assert held_slots(redis_server, user_id_of(on_first)) == CAP
        release.set()
        upstream.release()
        outcomes = sorted(a.result() for a in attempts)
        no_longer_held = eventually(lambda: held_slots(redis_server, user_id_of(on_first)) == 0, "slots back")
        relay = next(limit for limit in on_first.get("/api/usage").json()["limits"] if limit["name"] == "relay")

    assert no_longer_held
    assert outcomes == ["admitted"] * CAP + ["too_many_streams"] * (len(attempts) - CAP)
    assert relay["remaining"] == RELAYS_PER_MINUTE - CAP  # the refused ones counted nothing


def test_a_killed_replica_gives_its_stream_slots_back_within_the_lease(
    emulator: ServerProcess,
    redis_server: RedisServer,
    replicas: tuple[ServerProcess, ServerProcess],
    upstream: EmulatorControl,
) -> None:
    _, survivor = replicas
    doomed = start_proxy(emulator.url, **replica_env(redis_server))
    try:
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, times=CAP)
        with signed_in(doomed) as on_doomed, same_browser(survivor, on_doomed) as on_survivor, ExitStack() as held:
            bodies = [started(held.enter_context(on_doomed.stream("POST", STREAM, json=INPUTS))) for _ in range(CAP)]
            assert_refused(on_survivor.post(STREAM, json=INPUTS), "too_many_streams")

            # SIGKILL: no release, no drain; the leases it held stop being renewed and lapse.
            doomed.stop(signal.SIGKILL)
            for body in bodies:  # its browsers see a broken stream, never one that looks complete
                with pytest.raises(httpx.TransportError):
                    b"".join(body)

            admitted = eventually(stream_admitted(on_survivor), "the dead replica's slots lapsing", LEASE_LAPSE_BOUND)
            assert admitted.status_code == 200
            assert admitted.text == EXPECTED
            # The dead replica's upstream streams ended with it, rather than running on for nobody.
            upstream.wait(CAP, kind="stream_end", reason="cancelled")
    finally:
        doomed.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def long_lease(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[ServerProcess]:
    """A replica whose leases outlive every bound below by far: a slot it frees was released, not lapsed."""
    # Streams end at 2 s, for the deadline; the other endings use short answers, far within it.
    env = {**replica_env(redis_server), "BFF_STREAM_LEASE_SECONDS": "600", "BFF_MAX_STREAM_SECONDS": "2"}
    server = start_proxy(emulator.url, **env)
    yield server
    server.stop()


SHORT_ANSWER = ["A short ", "answer."]


def _completes(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", chunks=SHORT_ANSWER)
    assert client.post(STREAM, json=INPUTS).text == "".join(SHORT_ANSWER)


def _browser_leaves_before_the_first_byte(
    client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=60)
    body = b'{"message": "fractions"}'
    host, port = replica.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {STREAM} HTTP/1.1\r\nHost: {host}:{port}\r\nX-CSRF: 1\r\n"
            f"Cookie: {COOKIE}={client.cookies[COOKIE]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        upstream.wait(kind="stream_start")
    upstream.wait(kind="stream_end", reason="cancelled")


def _browser_leaves_mid_stream(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", STREAM, json=INPUTS) as response:
        started(response)  # and drops the rest: the browser leaves


def _upstream_fails_before_the_first_byte(
    client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", status=500)
    assert client.post(STREAM, json=INPUTS).json()["error"]["code"] == "upstream_error"


def _upstream_cuts_mid_stream(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=2)
    with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", STREAM, json=INPUTS) as response:
        response.read()


def _deadline_passes(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with pytest.raises(httpx.RemoteProtocolError), client.stream("POST", STREAM, json=INPUTS) as response:
        response.read()
    replica.wait_for_log(lambda entry: entry.get("end") == "deadline")


def _session_logs_out_mid_stream(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with client.stream("POST", STREAM, json=INPUTS) as response:
        body = started(response)
        with same_browser(replica, client) as other_tab:
            assert other_tab.post("/auth/logout").status_code == 204
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(body)


def _run_completes(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    assert client.post("/api/workflows/tutor/run", json=INPUTS).status_code == 200


def _run_fails(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="run", workflow="wf_tutor", status=500)
    assert client.post("/api/workflows/tutor/run", json=INPUTS).status_code == 502


def _chat_completes(client: httpx.Client, upstream: EmulatorControl, replica: ServerProcess) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", chunks=SHORT_ANSWER)
    chat = {"messages": [{"role": "user", "content": "fractions"}]}
    response = client.post("/api/chat/tutor", json=chat)
    assert response.status_code == 200
    assert '"type":"finish"' in response.text.replace(" ", "")


ENDINGS = [
    _completes,
    _browser_leaves_before_the_first_byte,
    _browser_leaves_mid_stream,
    _upstream_fails_before_the_first_byte,
    _upstream_cuts_mid_stream,
    _deadline_passes,
    _session_logs_out_mid_stream,
    _run_completes,
    _run_fails,
    _chat_completes,
]


@pytest.mark.parametrize("ending", ENDINGS, ids=[ending.__name__.strip("_") for ending in ENDINGS])
def test_a_stream_gives_its_slot_back_however_it_ends(
    long_lease: ServerProcess,
    redis_server: RedisServer,
    upstream: EmulatorControl,
    ending: Callable[[httpx.Client, EmulatorControl, ServerProcess], None],
) -> None:
    with signed_in(long_lease) as client:
        user_id = user_id_of(client)

        ending(client, upstream, long_lease)

    # The release is the relay's last step, just after the browser saw the end: wait for it, far
    # less long than the lease, so a slot that was dropped rather than released would still show.
    eventually(lambda: held_slots(redis_server, user_id) == 0, f"the slot released after {ending.__name__}")


def test_a_replica_shut_down_mid_stream_drains_then_gives_its_slots_back(
    emulator: ServerProcess,
    redis_server: RedisServer,
    replicas: tuple[ServerProcess, ServerProcess],
    upstream: EmulatorControl,
) -> None:
    """SIGTERM, as in a rolling deploy: a stream that finishes within `BFF_DRAIN_SECONDS` completes, one
    that would not is ended when it passes, and the replica releases both slots before it exits."""
    _, survivor = replicas
    stopping = start_proxy(emulator.url, **{**replica_env(redis_server), "BFF_DRAIN_SECONDS": "3"})
    try:
        # One answer waits for a release and is then done at once; the other takes ~50 s, past the drain.
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, chunks=["almost ", "done"])
        upstream.fault(op="stream", workflow="wf_tutor", delay=1.0)
        with signed_in(stopping) as client, ExitStack() as held:
            user_id = user_id_of(client)
            finishing, cut = (held.enter_context(client.stream("POST", STREAM, json=INPUTS)) for _ in range(2))
            finishing_body, cut_body = started(finishing), started(cut)
            assert held_slots(redis_server, user_id) == CAP

            stopping.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            stopping.wait_for_log(lambda entry: entry.get("message") == "draining")
            upstream.release()

            assert b"".join(finishing_body) == b"done"
            with pytest.raises(httpx.RemoteProtocolError):  # plain text has no in-band error: a broken stream
                b"".join(cut_body)
            stopping.process.wait(30)  # type: ignore[union-attr]  # exits by itself once drained
            assert held_slots(redis_server, user_id) == 0  # released before it exited, not left to lapse
            with same_browser(survivor, client) as elsewhere:  # the session lives on, on the other replica
                assert elsewhere.post(STREAM, json=INPUTS).text == EXPECTED
        ended = stopping.wait_for_log(lambda entry: entry.get("message") == "drain deadline passed")
        assert ended["relays_ended"] == 1
    finally:
        stopping.stop(signal.SIGKILL)


# Sessions


def test_a_logout_on_one_replica_refuses_the_cookie_on_the_other_and_ends_its_streams_there(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with (
        signed_in(first) as on_first,
        same_browser(second, on_first) as on_second,
        on_second.stream("POST", STREAM, json=INPUTS) as running,
    ):
        body = started(running)
        user = on_first.get("/auth/session").json()["user"]
        assert on_second.get("/auth/session").json()["user"] == user

        assert on_first.post("/auth/logout").status_code == 204

        for refused in (on_second.get("/auth/session"), on_second.post(STREAM, json=INPUTS)):
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthenticated"
        # The stream the second replica was running ends at its next lease renewal; as plain text
        # has no in-band error, it breaks off rather than looking complete.
        with pytest.raises(httpx.RemoteProtocolError):
            b"".join(body)
    assert upstream.wait(kind="stream_end")[0]["reason"] == "cancelled"
    second.wait_for_log(lambda entry: entry.get("end") == "revoked")


NEW_SECRET = "rotated-in-session-secret-f42546d5ecdd452509808b2d6d0413b5a738c70a"


def test_a_key_rotation_reaching_one_replica_first_logs_nobody_out(
    emulator: ServerProcess, redis_server: RedisServer
) -> None:
    """The new key reaches B while A still has only the old one (`deploy/README.md` rolls it out in
    steps to avoid even the one refusal below).

    Expected: every cookie A signed works on both; a cookie B signs with the new key works on B, is
    refused by A (which cannot verify it, and answers as for any cookie it cannot read), and works on
    A as soon as A also knows the new key, because the session behind it was in Redis all along.
    """
    env = {key: value for key, value in replica_env(redis_server).items() if key == "BFF_STORAGE_URL"}
    old_only = start_proxy(emulator.url, BFF_SESSION_SECRETS=SESSION_SECRET, **env)
    rotated = start_proxy(emulator.url, BFF_SESSION_SECRETS=f"{NEW_SECRET},{SESSION_SECRET}", **env)
    updated: ServerProcess | None = None
    try:
        with signed_in(old_only) as before:
            signed_old, user_old = before.cookies[COOKIE], before.get("/auth/session").json()["user"]
        with signed_in(rotated) as after:
            signed_new, user_new = after.cookies[COOKIE], after.get("/auth/session").json()["user"]

        for replica in (old_only, rotated):
            with with_cookie(replica, signed_old) as client:
                assert client.get("/auth/session").json()["user"] == user_old
        with with_cookie(old_only, signed_new) as client:
            refused = client.get("/auth/session")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthenticated"

        old_only.stop()
        updated = start_proxy(emulator.url, BFF_SESSION_SECRETS=f"{NEW_SECRET},{SESSION_SECRET}", **env)
        for cookie, user in ((signed_new, user_new), (signed_old, user_old)):
            with with_cookie(updated, cookie) as client:
                assert client.get("/auth/session").json()["user"] == user
    finally:
        for server in (old_only, rotated, updated):
            if server is not None:
                server.stop()


# Redis going away


def test_redis_stopped_mid_test_gives_503s_then_recovery_with_no_lost_session(
    replicas: tuple[ServerProcess, ServerProcess], redis_server: RedisServer, upstream: EmulatorControl
) -> None:
    first, second = replicas
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
    with (
        signed_in(first) as on_first,
        same_browser(second, on_first) as on_second,
        browser(second.url) as newcomer,
        on_first.stream("POST", STREAM, json=INPUTS) as running,
    ):
        user = on_first.get("/auth/session").json()["user"]
        body = running.iter_raw()
        received = next(body)

        redis_server.stop()
        try:
            refusals = {
                "sign-in": newcomer.post("/auth/guest"),
                "session": on_first.get("/auth/session"),  # never "signed out", never "fine"
                "relay": on_second.post(STREAM, json=INPUTS),
                "mint": on_first.post("/api/token", json={"workflow": "tutor"}),
            }
            for what, refused in refusals.items():
                assert refused.status_code == 503, what
                assert refused.json()["error"]["code"] == "storage_unavailable", what
                assert refused.headers["retry-after"].isdigit(), what
                assert "set-cookie" not in refused.headers, what
            for replica in (first, second):
                assert httpx.get(f"{replica.url}/readyz").status_code == 503
                assert httpx.get(f"{replica.url}/healthz").status_code == 200

            # A stream that was already running needs no storage until it ends: it completes.
            upstream.release()
            received += b"".join(body)
            assert received.decode() == EXPECTED
        finally:
            redis_server.start()  # same port, same data (append-only file)

        for replica in (first, second):
            assert httpx.get(f"{replica.url}/readyz").status_code == 200
        for client in (on_first, on_second):
            assert client.get("/auth/session").json()["user"] == user  # the session survived
        assert on_second.post(STREAM, json=INPUTS).text == EXPECTED
        assert newcomer.post("/auth/guest").status_code == 200


# Output budget


def test_the_output_budget_is_charged_with_what_was_relayed_on_any_replica_then_refuses(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    piece = 30_000
    # Three pieces, cut off after two: 60,000 characters relayed of an answer of 90,000.
    upstream.fault(op="stream", workflow="wf_tutor", chunks=["a" * piece] * 3, cut_after=2)
    upstream.fault(op="stream", workflow="wf_tutor", chunks=["b" * piece] * 2)
    with signed_in(first) as on_first, same_browser(second, on_first) as on_second:
        assert output_budget(on_second) == {"limit": DAILY_OUTPUT_CHARS, "used": 0}

        with pytest.raises(httpx.RemoteProtocolError), on_first.stream("POST", STREAM, json=INPUTS) as cut:
            cut.read()
        eventually(lambda: output_budget(on_second)["used"] == 2 * piece, "the cut stream charged on the other replica")

        # 60,000 of 100,000 used: admitted, and charged as it flows, a batch at a time. The batch that
        # crosses the line is the last one relayed: the stream ends there (plain text cannot say why:
        # it is cut), at most one batch past the budget.
        received = b""
        with pytest.raises(httpx.RemoteProtocolError), on_second.stream("POST", STREAM, json=INPUTS) as crossing:
            assert crossing.status_code == 200
            for chunk in crossing.iter_raw():
                received += chunk
        assert set(received) == {ord("b")}
        total = 2 * piece + len(received)
        assert DAILY_OUTPUT_CHARS <= total <= DAILY_OUTPUT_CHARS + BATCH_CHARS
        eventually(lambda: output_budget(on_first)["used"] == total, "the crossing stream charged")

        for client in (on_first, on_second):
            assert_refused(client.post(STREAM, json=INPUTS), "budget_exhausted")
            assert_refused(client.post("/api/workflows/tutor/run", json=INPUTS), "budget_exhausted")
            assert output_budget(client) == {"limit": DAILY_OUTPUT_CHARS, "used": total}
        # Refused up front: nothing more reached the upstream, and minting is not charged.
        assert len(upstream.requests("stream")) == 2
        assert upstream.requests("run") == []
        assert on_first.post("/api/token", json={"workflow": "tutor"}).status_code == 200
