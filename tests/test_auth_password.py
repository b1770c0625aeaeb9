"""`password` sign-in (CONTRACT B1): `POST /auth/login` against a users file of argon2id hashes, with
failed attempts throttled per username and per client IP, and `python -m proxy users add`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.identity import PASSWORD, write_users
from tests.servers import ROOT, ServerProcess, browser, start_proxy

WRONG = "not the password"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_users(tmp_path_factory.mktemp("users") / "users.json", {"alice": PASSWORD, "bob": PASSWORD})


@pytest.fixture(scope="module")
def password_proxy(emulator: ServerProcess, users_file: Path) -> Iterator[ServerProcess]:
    server = start_proxy(
        emulator.url,
        BFF_AUTH="guest,password",
        BFF_USERS_FILE=str(users_file),
        BFF_LOGIN_FAILURES_PER_USER="3",
        BFF_LOGIN_FAILURES_PER_IP="1000",
    )
    yield server
    server.stop()


def login(client: httpx.Client, username: str, password: str, **headers: str) -> httpx.Response:
    return client.post("/auth/login", json={"username": username, "password": password}, headers=headers)


def test_the_right_password_signs_in(password_proxy: ServerProcess) -> None:
    with browser(password_proxy.url) as client:
        response = login(client, "alice", PASSWORD)

        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.json()["user"] == {"id": "alice", "kind": "password"}
        assert client.get("/auth/session").json()["user"]["id"] == "alice"
    assert PASSWORD not in "\n".join(password_proxy.logs)


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(password_proxy: ServerProcess) -> None:
    with browser(password_proxy.url) as client:
        wrong = login(client, "alice", WRONG)
        unknown = login(client, "nobody-at-all", WRONG)

    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
    assert wrong.content == unknown.content
    assert wrong.json()["error"]["code"] == "unauthenticated"


def test_wrong_passwords_past_the_throttle_are_refused_even_with_the_right_one(password_proxy: ServerProcess) -> None:
    with browser(password_proxy.url) as client:
        assert [login(client, "bob", WRONG).status_code for _ in range(3)] == [401, 401, 401]

        throttled = login(client, "bob", PASSWORD)
        other_case = login(client, "BOB", PASSWORD)  # case variants share one budget
        alice = login(client, "alice", PASSWORD)  # the throttle is per username, not global

    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "rate_limited"
    assert 0 < int(throttled.headers["retry-after"]) <= 900
    assert other_case.status_code == 429
    assert alice.status_code == 200


def test_parallel_guesses_cannot_all_pass_the_check_before_the_first_failure_counts(
    password_proxy: ServerProcess,
) -> None:
    """Attempts still being verified count as failures: 8 guesses at once against a budget of 3 get
    at most 3 verdicts; the others are refused before any password is checked."""
    guesses = 8
    start = threading.Barrier(guesses)

    def guess(_: int) -> int:
        with browser(password_proxy.url) as client:
            start.wait(timeout=30)
            return login(client, "erin", WRONG).status_code

    with ThreadPoolExecutor(guesses) as pool:
        statuses = list(pool.map(guess, range(guesses)))

    assert statuses.count(401) <= 3, statuses
    assert statuses.count(401) + statuses.count(429) == guesses, statuses
    with browser(password_proxy.url) as client:  # and the budget is spent, not only busy
        assert login(client, "erin", WRONG).status_code == 429


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice"},
        {"username": "alice", "password": PASSWORD, "remember": True},
        {"username": "alice", "password": 123},
        {"username": "", "password": PASSWORD},
        {"username": "../etc/passwd", "password": PASSWORD},
        {"username": "alice", "password": "x" * 1025},
        ["alice", PASSWORD],
    ],
)
def test_a_malformed_login_body_is_a_422(password_proxy: ServerProcess, body: object) -> None:
    with browser(password_proxy.url) as client:
        response = client.post("/auth/login", json=body)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_a_form_encoded_login_is_refused(password_proxy: ServerProcess) -> None:
    """A cross-site HTML form can post urlencoded bodies without a preflight; we take JSON only."""
    with browser(password_proxy.url) as client:
        response = client.post("/auth/login", data={"username": "alice", "password": PASSWORD})

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored(emulator: ServerProcess, users_file: Path) -> None:
    """Without BFF_TRUSTED_PROXIES, rotating X-Forwarded-For does not buy a fresh per-IP budget."""
    server = start_proxy(
        emulator.url,
        BFF_AUTH="password",
        BFF_USERS_FILE=str(users_file),
        BFF_LOGIN_FAILURES_PER_IP="3",
        BFF_LOGIN_FAILURES_PER_USER="100",
    )
    try:
        with browser(server.url) as client:
            statuses = [
                login(client, f"sprayed{n}", WRONG, **{"X-Forwarded-For": f"198.51.100.{n}"}).status_code
                for n in range(4)
            ]
    finally:
        server.stop()

    assert statuses == [401, 401, 401, 429]


def test_x_forwarded_for_from_a_trusted_proxy_is_the_client_ip(emulator: ServerProcess, users_file: Path) -> None:
    server = start_proxy(
        emulator.url,
        BFF_AUTH="password",
        BFF_USERS_FILE=str(users_file),
        BFF_LOGIN_FAILURES_PER_IP="3",
        BFF_LOGIN_FAILURES_PER_USER="100",
        BFF_TRUSTED_PROXIES="127.0.0.1/32",
    )
    try:
        with browser(server.url) as client:
            distinct = [
                login(client, "alice", WRONG, **{"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(4)
            ]
            same = [login(client, "alice", WRONG, **{"X-Forwarded-For": "203.0.113.7"}).status_code for _ in range(4)]
            other = login(client, "alice", PASSWORD, **{"X-Forwarded-For": "203.0.113.8"})
    finally:
        server.stop()

    assert distinct == [401, 401, 401, 401]  # four different clients behind the proxy
    assert same == [401, 401, 401, 429]
    assert other.status_code == 200


def run_users(users_file: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "users", *args],
        input=None if password is None else password + "\n",
        env={**env, "BFF_USERS_FILE": str(users_file)},
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_users_add_writes_an_argon2id_hash_that_a_running_server_picks_up(
    password_proxy: ServerProcess, users_file: Path
) -> None:
    new_password = "a brand new password"
    with browser(password_proxy.url) as client:
        assert login(client, "carol", new_password).status_code == 401

        added = run_users(users_file, "add", "carol", password=new_password)

        assert added.returncode == 0, added.stderr
        assert login(client, "carol", new_password).status_code == 200
    stored = json.loads(users_file.read_text())["users"]["carol"]["hash"]
    assert stored.startswith("$argon2id$")
    assert new_password not in users_file.read_text() + added.stdout + added.stderr
    assert users_file.stat().st_mode & 0o077 == 0


def test_users_add_refuses_duplicates_short_passwords_and_odd_names(tmp_path: Path) -> None:
    users_file = tmp_path / "users.json"
    assert run_users(users_file, "add", "dave", password=PASSWORD).returncode == 0

    duplicate = run_users(users_file, "add", "dave", password=PASSWORD)
    short = run_users(users_file, "add", "erin", password="short")
    odd = run_users(users_file, "add", "../erin", password=PASSWORD)
    replaced = run_users(users_file, "add", "dave", "--replace", password="another long password")
    removed = run_users(users_file, "remove", "dave")

    assert duplicate.returncode == 2 and "--replace" in duplicate.stderr
    assert short.returncode == 2 and "password" in short.stderr
    assert odd.returncode == 2
    assert replaced.returncode == 0 and removed.returncode == 0
    assert json.loads(users_file.read_text()) == {"users": {}}


def test_behind_one_address_a_guessers_failures_do_not_lock_classmates_out(
    emulator: ServerProcess, tmp_path: Path
) -> None:
    """A school behind one NAT, with the default settings: one pupil guesses 25 times (their own account
    and made-up ones); the classmates, 30 of them, all sign in at the start of the lesson."""
    classmates = {f"pupil{n}": PASSWORD for n in range(30)}
    users = write_users(tmp_path / "users.json", {"guesser": PASSWORD, **classmates})
    server = start_proxy(emulator.url, BFF_AUTH="password", BFF_USERS_FILE=str(users), BFF_RATE_LIMITS="")
    try:
        with browser(server.url) as client:
            own = [login(client, "guesser", WRONG).status_code for _ in range(6)]
            made_up = {login(client, f"nobody{n}", WRONG).status_code for n in range(19)}
            signed_in = [login(client, name, PASSWORD).status_code for name in classmates]
    finally:
        server.stop()

    assert own == [401] * 5 + [429]  # the guesser's own account from this address: five tries
    assert made_up == {401}
    assert signed_in == [200] * 30


def test_an_address_that_sprays_guesses_over_many_accounts_is_refused_altogether(
    emulator: ServerProcess, users_file: Path
) -> None:
    server = start_proxy(
        emulator.url, BFF_AUTH="password", BFF_USERS_FILE=str(users_file), BFF_LOGIN_FAILURES_PER_IP="10"
    )
    try:
        with browser(server.url) as client:
            sprayed = [login(client, f"name{n}", WRONG).status_code for n in range(10)]
            right = login(client, "alice", PASSWORD)
    finally:
        server.stop()

    assert sprayed == [401] * 10
    assert right.status_code == 429  # clearly attacking: even a right password waits out the window
