"""A relay's admission (issue 20): with Redis, one round trip (proxy/storage/admission_redis.py) that
answers exactly as the step-by-step way does in memory: the same refusals, in the same order, with the
same codes, messages and headers, and a refused request keeps no slot and spends no rate.

Every scenario runs on a memory proxy and on a Redis one with the same settings, and their answers
are compared. The Redis proxies of one module share a `redis-server`, each on a database of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.servers import EmulatorControl, RedisServer, ServerProcess, browser, eventually, guest_of, start_proxy

STREAM = "/api/workflows/tutor/stream"
STORY = "/api/workflows/story/stream"
INPUTS = {"message": "fractions"}
RELAYS_PER_MINUTE = 3
WORKFLOWS_TOML = """
[workflows.tutor]
id = "wf_tutor"

[workflows.story]
id = "wf_story"
rate_limit = "1/minute"
"""
IDLE_SECONDS = 600
TOUCH_AFTER = 15.0  # sessions.TOUCH_GRAIN_SECONDS: below a quarter of IDLE_SECONDS
# Each configuration's Redis proxy keeps its state in a database of its own.
DATABASES = {"limits": 1, "by_ip": 2, "budget": 3, "sessions": 4, "count": 5}
Pair = dict[str, ServerProcess]


def settings(tmp_path: Path, **overrides: str) -> dict[str, str]:
    workflows = tmp_path / "workflows.toml"
    workflows.write_text(WORKFLOWS_TOML)
    return {
        "BFF_RATE_LIMITS": f"mint=10000/minute;relay={RELAYS_PER_MINUTE}/minute;login=10000/minute",
        "BFF_WORKFLOWS": "",
        "BFF_WORKFLOWS_FILE": str(workflows),
        "BFF_MAX_CONCURRENT_STREAMS": "1",
        "BFF_SESSION_IDLE_SECONDS": str(IDLE_SECONDS),
        **overrides,
    }


def database(redis_server: RedisServer, name: str) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{DATABASES[name]}"


@contextmanager
def memory_and_redis(
    emulator: ServerProcess, redis_server: RedisServer, name: str, env: dict[str, str]
) -> Iterator[Pair]:
    with ExitStack() as stack:
        pair = {}
        for backend, url in (("memory", "memory://"), ("redis", database(redis_server, name))):
            server = start_proxy(emulator.url, BFF_STORAGE_URL=url, **env)
            stack.callback(server.stop)
            pair[backend] = server
        yield pair


@pytest.fixture(scope="module")
def limits_pair(
    emulator: ServerProcess, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    env = settings(tmp_path_factory.mktemp("limits"))
    with memory_and_redis(emulator, redis_server, "limits", env) as pair:
        yield pair


@pytest.fixture(scope="module")
def by_ip_pair(
    emulator: ServerProcess, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    env = settings(tmp_path_factory.mktemp("by_ip"), BFF_GUEST_LIMITS="ip")
    with memory_and_redis(emulator, redis_server, "by_ip", env) as pair:
        yield pair


@pytest.fixture(scope="module")
def budget_pair(
    emulator: ServerProcess, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    env = settings(tmp_path_factory.mktemp("budget"), BFF_DAILY_OUTPUT_CHARS="1")
    with memory_and_redis(emulator, redis_server, "budget", env) as pair:
        yield pair


@pytest.fixture(scope="module")
def on_redis(
    emulator: ServerProcess, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, redis.Redis]]:
    env = settings(tmp_path_factory.mktemp("sessions"), BFF_STORAGE_URL=database(redis_server, "sessions"))
    server = start_proxy(emulator.url, **env)
    client = redis.Redis.from_url(database(redis_server, "sessions"), decode_responses=True)
    yield server, client
    client.close()
    server.stop()


def refusal(response: httpx.Response) -> dict[str, Any]:
    """What a refused request answered, as comparable between two proxies: Retry-After and
    X-RateLimit-Reset are times, so only how far off they are is kept (a minute at most, or later)."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    headers = response.headers

    def how_far(seconds: int) -> str:
        return "within a minute" if 0 <= seconds <= 61 else "later"

    retry_after = int(headers["retry-after"])
    return {
        "code": error["code"],
        # "try again in N seconds": N is a time too
        "message": " ".join("N" if word.isdigit() else word for word in error["message"].split(" ")),
        "retry_after": retry_after if error["code"] == "too_many_streams" else how_far(retry_after),
        "limit": headers.get("x-ratelimit-limit"),
        "remaining": headers.get("x-ratelimit-remaining"),
        "reset": how_far(int(headers["x-ratelimit-reset"]) - int(time.time()))
        if "x-ratelimit-reset" in headers
        else None,
    }


def remaining(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    return response.headers["x-ratelimit-limit"], response.headers["x-ratelimit-remaining"]


def relayed(client: httpx.Client, path: str = STREAM) -> tuple[str, str]:
    """A whole relay's rate-limit headers, once its slot is back (the cap is one)."""
    counted = remaining(client.post(path, json=INPUTS))
    no_stream_open(client)
    return counted


def streams_in_use(client: httpx.Client) -> int:
    in_use: int = client.get("/api/usage").json()["streams"]["in_use"]
    return in_use


def no_stream_open(client: httpx.Client) -> None:
    eventually(lambda: streams_in_use(client) == 0, "the finished streams' slots given back")


def on_both(pair: Pair, scenario: Callable[[ServerProcess], Any]) -> Any:
    """The scenario's outcome on the memory proxy, checked to be the Redis proxy's too."""
    outcomes = {backend: scenario(server) for backend, server in pair.items()}
    assert outcomes["redis"] == outcomes["memory"]
    return outcomes["memory"]


# Refusals, memory and Redis alike


def test_a_spent_rate_refuses_alike_and_keeps_no_slot(limits_pair: Pair) -> None:
    def scenario(server: ServerProcess) -> Any:
        with guest_of(server.url) as client:
            admitted = [relayed(client) for _ in range(RELAYS_PER_MINUTE)]
            refused = refusal(client.post(STREAM, json=INPUTS))
            return admitted, refused, streams_in_use(client)  # at once: the refusal kept no slot

    admitted, refused, in_use = on_both(limits_pair, scenario)

    assert admitted == [("3", "2"), ("3", "1"), ("3", "0")]
    assert refused["code"] == "rate_limited"
    assert (refused["limit"], refused["remaining"]) == ("3", "0")
    assert refused["retry_after"] == refused["reset"] == "within a minute"
    assert in_use == 0


def test_a_workflows_own_limit_refuses_alike_without_spending_the_relay_limit(limits_pair: Pair) -> None:
    def scenario(server: ServerProcess) -> Any:
        with guest_of(server.url) as client:
            first = relayed(client, STORY)  # the tighter of the two: the story's own
            refused = refusal(client.post(STORY, json=INPUTS))
            after = remaining(client.post(STREAM, json=INPUTS))
            return first, refused, after

    first, refused, after = on_both(limits_pair, scenario)

    assert first == ("1", "0")
    assert (refused["code"], refused["limit"], refused["remaining"]) == ("rate_limited", "1", "0")
    assert after == ("3", "1")  # the story's first relay and this one: the refused one counted nothing


def test_a_full_slot_refuses_alike_without_spending_the_rate(limits_pair: Pair, upstream: EmulatorControl) -> None:
    def scenario(server: ServerProcess) -> Any:
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, times=1)
        with guest_of(server.url) as client, client.stream("POST", STREAM, json=INPUTS) as held:
            assert held.status_code == 200
            body = held.iter_raw()
            assert next(body)
            refused = refusal(client.post(STREAM, json=INPUTS))
            upstream.release()
            b"".join(body)
            no_stream_open(client)
            return refused, remaining(client.post(STREAM, json=INPUTS))

    refused, after = on_both(limits_pair, scenario)

    assert refused["code"] == "too_many_streams"
    assert refused["message"] == "At most N answers can stream at once; wait for one to finish."
    assert (refused["retry_after"], refused["remaining"]) == (5, None)
    assert after == ("3", "1")  # the held one and this one


def test_guests_sharing_an_address_share_its_slot_and_rate_alike(by_ip_pair: Pair, upstream: EmulatorControl) -> None:
    def scenario(server: ServerProcess) -> Any:
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1, times=1)
        with guest_of(server.url) as alice, guest_of(server.url) as bob:
            with alice.stream("POST", STREAM, json=INPUTS) as held:
                body = held.iter_raw()
                assert next(body)
                slot = refusal(bob.post(STREAM, json=INPUTS))  # alice's stream holds the address's one slot
                upstream.release()
                b"".join(body)
            no_stream_open(bob)
            counted = [relayed(bob) for _ in range(RELAYS_PER_MINUTE - 1)]
            rate = refusal(alice.post(STREAM, json=INPUTS))
            return slot, counted, rate

    slot, counted, rate = on_both(by_ip_pair, scenario)

    assert slot["code"] == "too_many_streams"
    assert counted == [("3", "1"), ("3", "0")]  # after alice's
    assert (rate["code"], rate["remaining"]) == ("rate_limited", "0")


def test_a_spent_budget_refuses_alike_before_the_slot_and_the_rate(budget_pair: Pair) -> None:
    def scenario(server: ServerProcess) -> Any:
        with guest_of(server.url) as client:
            spending = client.post(STREAM, json=INPUTS)  # its first characters spend the budget
            assert spending.status_code == 200
            eventually(lambda: client.get("/api/usage").json()["output_chars"]["left"] == 0, "the charge stored")
            refused = client.post(STREAM, json=INPUTS)
            usage = client.get("/api/usage").json()
            relay = next(limit for limit in usage["limits"] if limit["name"] == "relay" and not limit["workflow"])
            return refusal(refused), relay["remaining"]

    refused, relay_remaining = on_both(budget_pair, scenario)

    assert (refused["code"], refused["retry_after"]) == ("budget_exhausted", "later")
    assert relay_remaining == RELAYS_PER_MINUTE - 1  # the refused ones counted nothing


# Sessions on the one-round-trip way


def session_key(client: redis.Redis) -> str:
    """The storage key of the one session in this proxy's database that a test just signed in."""
    keys = [key for key in client.scan_iter("bff:session:*")]
    assert len(keys) == 1
    return str(keys[0])


@contextmanager
def only_session(server: ServerProcess, client: redis.Redis) -> Iterator[tuple[httpx.Client, str]]:
    client.flushdb()
    with guest_of(server.url) as browser_client:
        yield browser_client, session_key(client)


def test_a_relay_touches_its_session_when_due_and_not_before(on_redis: tuple[ServerProcess, redis.Redis]) -> None:
    server, client = on_redis
    with only_session(server, client) as (guest, key):
        seen = time.time() - 1
        client.hset(key, "last_seen", repr(seen))
        relayed(guest)
        assert float(client.hget(key, "last_seen") or 0) == seen  # touched within the grain: left alone

        client.hset(key, "last_seen", repr(time.time() - TOUCH_AFTER - 1))
        before = time.time()
        relayed(guest)
        assert before <= float(client.hget(key, "last_seen") or 0) <= time.time()


def test_a_relay_on_an_idle_expired_session_revokes_it_with_its_audit_line(
    on_redis: tuple[ServerProcess, redis.Redis],
) -> None:
    server, client = on_redis
    with only_session(server, client) as (guest, key):
        client.hset(key, "last_seen", repr(time.time() - IDLE_SECONDS - 1))
        refused = guest.post(STREAM, json=INPUTS)

        assert refused.status_code == 401
        assert "bff_session=" in refused.headers["set-cookie"]  # the stale cookie expired
        assert not client.exists(key)
        server.wait_for_log(lambda e: e.get("audit") == "session.revoked" and e.get("reason") == "expired_idle")
        assert not list(client.scan_iter("bff-limits:*relay*"))  # nothing counted


def test_a_gone_session_answers_401_before_a_bad_body_or_workflow(on_redis: tuple[ServerProcess, redis.Redis]) -> None:
    server, client = on_redis
    with only_session(server, client) as (guest, key):
        client.delete(key)
        answers = [
            guest.post(STREAM, content=b"{not json", headers={"content-type": "application/json"}),
            guest.post("/api/workflows/nope/stream", json=INPUTS),
            guest.post("/api/chat/tutor?protocol=nope", json={}),
        ]

    assert [answer.status_code for answer in answers] == [401, 401, 401]


def test_a_bad_body_on_a_live_session_costs_nothing_and_still_touches_it(
    on_redis: tuple[ServerProcess, redis.Redis],
) -> None:
    server, client = on_redis
    with only_session(server, client) as (guest, key):
        client.hset(key, "last_seen", repr(time.time() - TOUCH_AFTER - 1))
        before = time.time()
        refused = guest.post(STREAM, content=b"{not json", headers={"content-type": "application/json"})

        assert refused.status_code == 422
        assert before <= float(client.hget(key, "last_seen") or 0)
        assert remaining(guest.post(STREAM, json=INPUTS)) == ("3", "2")


# One round trip


def admission_commands(redis_url: str, relay: Callable[[], None]) -> list[str]:
    """The commands the proxy sent Redis for `relay` before it stored the run's meta (`SET bff:run:`),
    as MONITOR saw them: every one a round trip of the admission (commands a script ran are left out)."""
    marker = f"end-of-relay-{time.time()}"
    watcher, other = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    other.ping()  # connected before MONITOR starts, so its handshake is not seen
    with watcher.monitor() as monitor:
        relay()
        other.echo(marker)  # on another connection, after the relay's commands
        seen: list[list[str]] = []
        while True:
            command = monitor.next_command()
            if marker in command["command"]:
                break
            if command.get("client_type") != "lua":
                seen.append(command["command"].split())
    watcher.close()
    other.close()
    admission = []
    for words in seen:
        if words[0].upper() == "SET" and words[1].startswith("bff:run:"):
            return admission
        if words[0].upper() not in ("MULTI", "ECHO"):
            admission.append(words[0].upper())
    return admission  # it stored no run


def test_a_relay_admission_is_one_redis_round_trip(
    emulator: ServerProcess, redis_server: RedisServer, tmp_path: Path
) -> None:
    url = database(redis_server, "count")
    server = start_proxy(emulator.url, **settings(tmp_path, BFF_STORAGE_URL=url, BFF_DAILY_OUTPUT_CHARS="1000000"))
    try:
        with guest_of(server.url) as guest:
            assert guest.post(STREAM, json=INPUTS).status_code == 200  # Redis now knows the script
            no_stream_open(guest)

            commands = admission_commands(url, lambda: guest.post(STREAM, json=INPUTS).raise_for_status())
    finally:
        server.stop()

    assert commands == ["EVALSHA"]


def test_an_unsigned_cookie_is_refused_without_asking_redis(
    on_redis: tuple[ServerProcess, redis.Redis], redis_server: RedisServer
) -> None:
    server, _ = on_redis
    with browser(server.url, cookies={"bff_session": "forged.value.here"}) as forged:
        commands = admission_commands(
            database(redis_server, "sessions"), lambda: forged.post(STREAM, json=INPUTS) and None
        )
    assert commands == []
