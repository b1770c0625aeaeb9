"""Usage for the user and the operator (issue 19): `GET /api/usage`, the chat routes' `X-RateLimit-*`
headers, and `python -m proxy usage`.

Two `python -m proxy serve` replicas share a real `redis-server`; every figure checked is what the
clients read (the characters of the text each one received), against what either replica reports and
what the command line ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.servers import (
    ROOT,
    TEST_API_KEY,
    EmulatorControl,
    RedisServer,
    ServerProcess,
    browser,
    eventually,
    guest_of,
    proxy_env,
    proxy_with,
    replicas_of,
    start_proxy,
)
from tests.test_chat_protocols import chat_path, data_parts, sse_events, text_of
from tests.test_replicas import same_browser, signed_in

RELAYS_PER_MINUTE = 6
MINTS_PER_MINUTE = 4
CAP = 3
BUDGET = 5_000
PROTOCOLS = ["ui", "text", "data"]


def chat_body(chat_id: str) -> dict[str, Any]:
    return {"id": chat_id, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "go"}]}]}


def text_read(protocol: str, body: str) -> str:
    """The answer's text as the client of `protocol` read it."""
    if protocol == "ui":
        return text_of(sse_events(body))
    if protocol == "data":
        return "".join(value for code, value in data_parts(body) if code == "0")
    return body


def usage(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/api/usage")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def used(client: httpx.Client) -> int:
    value: int = usage(client)["output_chars"]["used"]
    return value


def limit_of(client: httpx.Client, name: str) -> dict[str, Any]:
    (window,) = [window for window in usage(client)["limits"] if window["name"] == name]
    return window


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        # This checkout's code, whatever the environment has installed; run from where no .env is.
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def replicas(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[list[ServerProcess]]:
    env = {
        "BFF_STORAGE_URL": redis_server.url,
        "BFF_RATE_LIMITS": f"mint={MINTS_PER_MINUTE}/minute;relay={RELAYS_PER_MINUTE}/minute;login=10000/minute",
        "BFF_MAX_CONCURRENT_STREAMS": str(CAP),
    }
    with replicas_of(emulator.url, **env) as servers:  # no output budget: output is counted anyway
        yield servers


def user_id_of(client: httpx.Client) -> str:
    user_id: str = client.get("/auth/session").json()["user"]["id"]
    return user_id


# GET /api/usage


def test_output_used_is_what_the_clients_read_on_either_replica_and_the_cli_ranks_it(
    replicas: list[ServerProcess], redis_server: RedisServer, upstream: EmulatorControl
) -> None:
    first, second = replicas
    with signed_in(first) as ann, same_browser(second, ann) as ann_elsewhere, signed_in(second) as bob:
        # Ann: a chat in every protocol on either replica, and a whole answer (/run); Bob: an answer
        # whose characters are several bytes each, split between upstream chunks (latin-1 = raw bytes).
        read_by_ann = 0
        for n, protocol in enumerate(PROTOCOLS):
            client = (ann, ann_elsewhere)[n % 2]
            response = client.post(chat_path(protocol), json=chat_body(f"ann-{n}"))
            assert response.status_code == 200
            read_by_ann += len(text_read(protocol, response.text))
        whole = ann_elsewhere.post("/api/workflows/tutor/run", json={"message": "x"})
        read_by_ann += len(whole.json()["result"])
        raw = "café ✓ €".encode()
        upstream.fault(op="stream", workflow="wf_tutor", chunks=[raw[:4].decode("latin-1"), raw[4:].decode("latin-1")])
        read_by_bob = len(text_read("ui", bob.post("/api/chat/tutor", json=chat_body("bob")).text))

        # The last batch of a run is charged as it ends, just after its client read the end.
        eventually(lambda: used(ann) == read_by_ann, "ann's charges")
        eventually(lambda: used(bob) == read_by_bob, "bob's charges")
        assert used(ann_elsewhere) == read_by_ann
        assert usage(ann)["counted_for"] == "user"  # guests limited per session here
        ann_id, bob_id = user_id_of(ann), user_id_of(bob)

    assert read_by_bob == len("café ✓ €") < len(raw)  # characters, not bytes
    env = {**proxy_env("http://127.0.0.1:9"), "BFF_STORAGE_URL": redis_server.url}
    listed = cli("usage", "--json", "--top", "100", env=env)
    assert listed.returncode == 0, listed.stderr
    ranked = json.loads(listed.stdout)
    assert ranked["day"] == datetime.now(UTC).date().isoformat()
    totals = [entry["output_chars"] for entry in ranked["users"]]
    assert totals == sorted(totals, reverse=True)
    users = [entry["user"] for entry in ranked["users"]]
    assert ranked["users"][users.index(ann_id)]["output_chars"] == read_by_ann
    assert ranked["users"][users.index(bob_id)]["output_chars"] == read_by_bob
    assert users.index(ann_id) < users.index(bob_id)  # ann read more

    table = cli("usage", "--top", "100", env=env).stdout.splitlines()
    assert table[1].split() == ["rank", "characters", "user"]
    assert [row.split()[2] for row in table[2:]] == users
    assert f"{read_by_ann:,}" in table[2 + users.index(ann_id)]
    assert TEST_API_KEY not in listed.stdout + "\n".join(table)


def test_an_open_run_is_listed_on_every_replica_while_it_runs_and_each_run_costs_one_of_the_limit(
    replicas: list[ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    with signed_in(first) as client, same_browser(second, client) as elsewhere:
        before = usage(client)
        assert before["runs"] == [] and before["streams"] == {"limit": CAP, "in_use": 0}
        relay = limit_of(client, "relay")
        assert (relay["limit"], relay["remaining"], relay["workflow"]) == (
            f"{RELAYS_PER_MINUTE} per 1 minute",
            RELAYS_PER_MINUTE,
            None,
        )
        assert limit_of(elsewhere, "relay")["remaining"] == RELAYS_PER_MINUTE  # reading it counted nothing

        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)
        with client.stream("POST", chat_path("text"), json=chat_body("held")) as held:
            body = held.iter_raw()
            assert next(body)
            during = usage(elsewhere)
            upstream.release()
            b"".join(body)
        run_id = held.headers["x-run-id"]
        started = datetime.fromisoformat(during["runs"][0]["started_at"])
        assert during["runs"] == [
            {"run_id": run_id, "chat_id": "held", "workflow": "tutor", "started_at": during["runs"][0]["started_at"]}
        ]
        assert abs(datetime.now(UTC) - started) < timedelta(minutes=1)
        assert during["streams"] == {"limit": CAP, "in_use": 1}
        assert int(held.headers["x-ratelimit-remaining"]) == RELAYS_PER_MINUTE - 1
        assert limit_of(elsewhere, "relay")["remaining"] == RELAYS_PER_MINUTE - 1
        eventually(lambda: usage(elsewhere)["streams"]["in_use"] == 0, "the slot given back")
        assert usage(client)["runs"] == []

        second_run = elsewhere.post("/api/workflows/tutor/stream", json={"message": "x"})
        after = limit_of(client, "relay")
        assert int(second_run.headers["x-ratelimit-remaining"]) == after["remaining"] == RELAYS_PER_MINUTE - 2
        resets_at = datetime.fromisoformat(after["resets_at"]).timestamp()
        assert int(second_run.headers["x-ratelimit-reset"]) == resets_at
        minted = client.post("/api/token", json={"workflow": "tutor"})
        assert int(minted.headers["x-ratelimit-remaining"]) == limit_of(elsewhere, "mint")["remaining"]
        assert limit_of(elsewhere, "mint")["remaining"] == MINTS_PER_MINUTE - 1


def test_usage_needs_a_session_and_is_never_cached(replicas: list[ServerProcess]) -> None:
    first, _ = replicas
    with browser(first.url) as anonymous:
        refused = anonymous.get("/api/usage")
    with signed_in(first) as client:
        answer = client.get("/api/usage")

    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthenticated"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json()["output_chars"]["limit"] is None and answer.json()["output_chars"]["left"] is None


def test_with_a_budget_what_is_left_is_the_budget_less_what_was_read(
    emulator: ServerProcess, upstream: EmulatorControl
) -> None:
    with proxy_with(emulator.url, BFF_DAILY_OUTPUT_CHARS=str(BUDGET)) as client:
        read = len(text_read("data", client.post(chat_path("data"), json=chat_body("b")).text))
        eventually(lambda: used(client) == read, "the charge")
        output = usage(client)["output_chars"]

    midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
    assert output["limit"] == BUDGET
    assert output["left"] == BUDGET - read > 0
    assert datetime.fromisoformat(output["renews_at"]) == midnight


def test_guests_who_share_an_address_are_told_their_figures_are_the_addresss(
    emulator: ServerProcess, upstream: EmulatorControl
) -> None:
    server = start_proxy(emulator.url, BFF_GUEST_LIMITS="ip")
    try:
        with guest_of(server.url) as first, guest_of(server.url) as second:
            read = len(text_read("data", first.post(chat_path("data"), json=chat_body("g1")).text))
            eventually(lambda: used(second) == read, "the first guest's output, counted for the address")
            assert usage(second)["counted_for"] == usage(first)["counted_for"] == "address"
            assert usage(second)["runs"] == []  # the other guest's answers are not listed
    finally:
        server.stop()


# The chat routes carry the X-RateLimit-* headers /stream and /api/token carry


def test_chat_answers_and_refusals_carry_the_rate_limit_headers_in_every_protocol(
    replicas: list[ServerProcess],
) -> None:
    first, second = replicas
    with signed_in(first) as client, same_browser(second, client) as elsewhere:
        answers = [
            (client, elsewhere)[n % 2].post(chat_path(protocol), json=chat_body(f"c{n}"))
            for n, protocol in enumerate(PROTOCOLS * 2)
        ]
        refusals = [client.post(chat_path(protocol), json=chat_body("late")) for protocol in PROTOCOLS]

    assert [answer.status_code for answer in answers] == [200] * RELAYS_PER_MINUTE
    for n, answer in enumerate(answers):
        assert answer.headers["x-ratelimit-limit"] == str(RELAYS_PER_MINUTE)
        assert answer.headers["x-ratelimit-remaining"] == str(RELAYS_PER_MINUTE - 1 - n)
        assert int(answer.headers["x-ratelimit-reset"]) > datetime.now(UTC).timestamp()
    for refused in refusals:
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("text/plain")
        assert refused.headers["x-error-code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert (refused.headers["x-ratelimit-limit"], refused.headers["x-ratelimit-remaining"]) == ("6", "0")
        assert int(refused.headers["x-ratelimit-reset"]) > datetime.now(UTC).timestamp()


# python -m proxy usage


def test_the_usage_command_says_why_it_cannot_reach_memory_storage() -> None:
    result = cli("usage", env=proxy_env("http://127.0.0.1:9"))

    assert result.returncode == 2
    assert "memory://" in result.stderr and "inside the running server" in result.stderr


def test_the_usage_command_reads_another_day_and_refuses_a_day_that_is_none(redis_server: RedisServer) -> None:
    env = {**proxy_env("http://127.0.0.1:9"), "BFF_STORAGE_URL": redis_server.url}

    empty = cli("usage", "--json", "--day", "2001-01-01", env=env)
    wrong = cli("usage", "--day", "yesterday", env=env)

    assert json.loads(empty.stdout) == {"day": "2001-01-01", "users": []}
    assert wrong.returncode == 2 and "YYYY-MM-DD" in wrong.stderr
