"""Runs last: across everything this pytest run logged and received, no secret was where it must not be.

tests/servers.py keeps every log line of every server process and every response byte any test
client received. This file adds one full flow of its own, so it proves something when run alone too.
The scan includes what OpenID Connect sign-ins handle (tests/test_oidc.py): the client secret, and
every token the test identity provider issued, none of which may reach a browser or a log line.
"""

from __future__ import annotations

import re

import httpx

from tests.oidc_idp import CLIENT_SECRET, SEEN_IDP_TOKENS
from tests.servers import SEEN_LOG_LINES, SEEN_RESPONSES, SESSION_SECRET, TEST_API_KEY, EmulatorControl

TOKEN = re.compile(rb"pub_tok_[A-Za-z0-9_\-]+")
# A compact JWS (an ID, logout or access token): no log line may hold one.
JWT = re.compile(r"eyJ[\w-]{10,}\.eyJ[\w-]+\.")
COOKIE = re.compile(rb"set-cookie: [\w-]*bff_session=([^;\s]+)", re.IGNORECASE)


def test_no_secret_appears_in_any_response_or_log_line(guest: httpx.Client, upstream: EmulatorControl) -> None:
    minted = guest.post("/api/token", json={"workflow": "tutor"}).json()["token"]
    guest.post("/api/workflows/tutor/stream", json={"message": "x"})
    upstream.fault(op="mint", status=401)
    guest.post("/api/token", json={"workflow": "tutor"})
    guest.post("/auth/logout")

    responses = b"\n".join(SEEN_RESPONSES)
    logs = "\n".join(SEEN_LOG_LINES)
    assert minted.encode() in responses  # the scan sees what the clients saw
    for secret in (TEST_API_KEY, SESSION_SECRET, CLIENT_SECRET):
        assert secret.encode() not in responses
        assert secret not in logs
    # Minted tokens belong in /api/token answers only, never in a log line.
    tokens = {match.decode() for match in TOKEN.findall(responses)}
    assert tokens
    assert not [token for token in tokens if token in logs]
    # Session cookies (signed session ids) are never logged either.
    cookies = {match.decode() for match in COOKIE.findall(responses)} - {'""'}
    assert cookies
    assert not [cookie for cookie in cookies if cookie in logs]
    # The identity provider's tokens stay on the server: in no answer and in no log line.
    assert not [token for token in SEEN_IDP_TOKENS if token.encode() in responses or token in logs]
    assert not JWT.search(logs)
