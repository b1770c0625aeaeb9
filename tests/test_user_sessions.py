"""Sessions that end when they should (issue 16): a password reset or a removed user ends that user's
sessions on every replica, and operators can list and end a user's sessions from the command line.

Two replicas share a real `redis-server` and the users file, as a Kubernetes ConfigMap would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.identity import PASSWORD, write_users
from tests.servers import ROOT, TEST_API_KEY, RedisServer, ServerProcess, browser, eventually, proxy_env, replicas_of

NEW_PASSWORD = "a brand new password for alice"


def cli(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**clean, **env},
        cwd=ROOT / "tests",
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return write_users(tmp_path / "users.json", {"alice": PASSWORD, "bob": PASSWORD})


@pytest.fixture
def replicas(emulator: ServerProcess, redis_server: RedisServer, users_file: Path) -> Iterator[list[ServerProcess]]:
    env = {"BFF_AUTH": "password", "BFF_USERS_FILE": str(users_file), "BFF_STORAGE_URL": redis_server.url}
    with replicas_of(emulator.url, **env) as servers:
        yield servers


def signed_in(server: ServerProcess, name: str) -> httpx.Client:
    client = browser(server.url)
    client.post("/auth/login", json={"username": name, "password": PASSWORD}).raise_for_status()
    return client


def on(server: ServerProcess, client: httpx.Client) -> httpx.Client:
    return browser(server.url, cookies=client.cookies)


@pytest.mark.parametrize(
    ("action", "stdin"), [(["add", "alice", "--replace"], NEW_PASSWORD + "\n"), (["remove", "alice"], "")]
)
def test_a_password_reset_or_a_removed_user_ends_that_users_sessions_on_every_replica(
    replicas: list[ServerProcess], users_file: Path, redis_server: RedisServer, action: list[str], stdin: str
) -> None:
    first, second = replicas
    alice, bob = signed_in(first, "alice"), signed_in(first, "bob")
    alice_elsewhere = on(second, alice)
    assert alice_elsewhere.get("/auth/session").status_code == 200

    changed = cli("users", "--file", str(users_file), *action, env={}, stdin=stdin)
    assert changed.returncode == 0, changed.stderr

    eventually(lambda: alice.get("/auth/session").status_code == 401, "alice's session ending on the first replica")
    assert alice_elsewhere.get("/auth/session").status_code == 401
    assert bob.get("/auth/session").status_code == 200  # nobody else's
    # Both replicas watch the file; whichever notices first ends the sessions, and audits it.
    eventually(
        lambda: any(
            entry.get("audit") == "session.revoked" and entry.get("reason") == "password_changed"
            for replica in replicas
            for entry in replica.log_entries()
        ),
        "the revocation audited on a replica",
    )
    for client in (alice, bob, alice_elsewhere):
        client.close()


def test_operators_list_and_end_a_users_sessions_from_the_command_line(
    replicas: list[ServerProcess], redis_server: RedisServer
) -> None:
    first, second = replicas
    laptop, phone = signed_in(first, "alice"), signed_in(second, "alice")
    env = {**proxy_env("http://127.0.0.1:9"), "BFF_STORAGE_URL": redis_server.url}

    listed = cli("sessions", "list", "--user", "alice", env=env)
    ended = cli("sessions", "revoke", "--user", "alice", env=env)

    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.strip().splitlines()
    assert rows[0].split()[:3] == ["sid_hash", "created", "last"]
    assert len(rows) == 3 and all(row.endswith("password") for row in rows[1:])
    for cookie in (laptop.cookies["bff_session"], phone.cookies["bff_session"]):
        assert cookie not in listed.stdout and cookie.split(".")[0] not in listed.stdout
    assert ended.stdout.strip() == "ended 2 session(s) of alice"
    assert laptop.get("/auth/session").status_code == 401
    assert phone.get("/auth/session").status_code == 401
    assert TEST_API_KEY not in listed.stdout + listed.stderr
    laptop.close()
    phone.close()


def test_the_sessions_command_says_why_it_cannot_reach_memory_storage() -> None:
    result = cli("sessions", "revoke", "--user", "alice", env=proxy_env("http://127.0.0.1:9"))

    assert result.returncode == 2
    assert "memory://" in result.stderr and "Redis" in result.stderr
