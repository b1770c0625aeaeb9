"""No secret where it does not belong: every sign-in method, mint, relay, failures and logouts on one
live proxy, then a scan of everything it logged and everything its clients received.

Secrets here: the API key, the session signing keys, the JWT secret, passwords, raw session ids and
their storage keys, the JWTs browsers presented, and minted tokens outside the mint answer itself.
tests/test_zz_secrets.py repeats the fixed-secret part of this scan over the whole pytest run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.sessions import session_key
from tests.identity import AUDIENCE, ISSUER, JWT_SECRET, PASSWORD, hs256, session_id_of, write_users
from tests.servers import (
    SEEN_LOG_LINES,
    SESSION_SECRET,
    TEST_API_KEY,
    EmulatorControl,
    ServerProcess,
    browser,
    start_proxy,
)

WRONG_PASSWORD = "hunter2-but-wrong-" + "w" * 10


@pytest.fixture(scope="module")
def server(emulator: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    users: Path = write_users(tmp_path_factory.mktemp("leaks") / "users.json", {"alice": PASSWORD})
    process = start_proxy(
        emulator.url,
        BFF_AUTH="guest,jwt,password",
        BFF_JWT_SECRET=JWT_SECRET,
        BFF_JWT_ISSUER=ISSUER,
        BFF_JWT_AUDIENCE=AUDIENCE,
        BFF_USERS_FILE=str(users),
    )
    yield process
    process.stop()


def test_nothing_secret_reaches_a_log_line_or_a_response_where_it_does_not_belong(
    server: ServerProcess, upstream: EmulatorControl
) -> None:
    answers: list[httpx.Response] = []
    minted: list[str] = []
    cookies: list[str] = []
    jwts = [hs256(sub="leak-test"), hs256(sub="leak-test", aud="wrong-audience")]

    with browser(server.url) as client:

        def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            answer = client.request(method, path, **kwargs)
            answers.append(answer)
            issued = answer.cookies.get("bff_session")
            if issued and issued != '""':  # '""' is the logout's expired cookie
                cookies.append(issued)
            return answer

        call("POST", "/auth/guest")
        call("POST", "/auth/exchange", headers={"Authorization": f"Bearer {jwts[1]}"})  # refused
        call("POST", "/auth/exchange", headers={"Authorization": f"Bearer {jwts[0]}"})
        call("POST", "/auth/login", json={"username": "alice", "password": WRONG_PASSWORD})
        call("POST", "/auth/login", json={"username": "alice", "password": PASSWORD})
        mint = call("POST", "/api/token", json={"workflow": "tutor"})
        minted.append(mint.json()["token"])
        call("POST", "/api/workflows/tutor/stream", json={"topic": "leaks"})
        call("POST", "/api/workflows/tutor/run", json={"topic": "leaks"})
        upstream.fault(op="mint", status=401)
        call("POST", "/api/token", json={"workflow": "tutor"})  # the upstream refuses the key
        call("GET", "/auth/session")
        call("POST", "/auth/logout-all")
        call("POST", "/auth/logout")
    server.wait_for_log(lambda e: e.get("audit") == "session.revoked" and e.get("reason") == "logout_all")

    session_ids = [session_id_of(cookie, SESSION_SECRET) for cookie in cookies]
    assert len(session_ids) == 3  # guest, jwt and password sign-ins each issued one
    never_anywhere = [TEST_API_KEY, SESSION_SECRET, JWT_SECRET, PASSWORD, WRONG_PASSWORD, *session_ids]
    never_anywhere += [session_key(session_id) for session_id in session_ids]
    logs = "\n".join(server.logs)
    for secret in never_anywhere + jwts + minted + cookies:
        assert secret not in logs
    for answer in answers:
        received = answer.text + "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
        for secret in never_anywhere + jwts:
            assert secret not in received
        if answer is not mint:
            assert "pub_tok_" not in received
    assert minted[0] in mint.text  # the one place a token belongs


def test_no_log_line_of_the_whole_run_holds_a_sign_in_secret() -> None:
    logs = "\n".join(SEEN_LOG_LINES)
    for secret in (JWT_SECRET, PASSWORD, WRONG_PASSWORD):
        assert secret not in logs
