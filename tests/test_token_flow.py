"""Token-mediating mode (CONTRACT B2): guest sign-in, mint, and the browser streaming upstream itself."""

from __future__ import annotations

import time
from datetime import datetime

import httpx

from proxy.emulator import generate_text
from tests.servers import TEST_API_KEY, EmulatorControl


def test_guest_mints_a_token_and_streams_straight_from_the_upstream(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    minted = guest.post("/api/token", json={"workflow": "tutor"})

    assert minted.status_code == 200
    assert minted.headers["cache-control"] == "no-store"
    body = minted.json()
    assert body["token"].startswith("pub_tok_")
    assert body["ttl"] == 60
    assert datetime.fromisoformat(body["expires_at"]) > datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    assert body["stream_url"] == f"{upstream.url}/api/v1/run/wf_tutor/stream?token={body['token']}"

    # The browser's leg: no API key, only the token, straight to the upstream.
    streamed = httpx.post(body["stream_url"], json={"topic": "fractions"})
    assert streamed.status_code == 200
    assert streamed.text == generate_text("wf_tutor", {"topic": "fractions"})


def test_a_minted_token_works_once(guest: httpx.Client) -> None:
    stream_url = guest.post("/api/token", json={"workflow": "tutor"}).json()["stream_url"]

    assert httpx.post(stream_url, json={"topic": "a"}).status_code == 200
    assert httpx.post(stream_url, json={"topic": "a"}).status_code == 401


def test_every_mint_returns_a_fresh_token(guest: httpx.Client) -> None:
    tokens = {guest.post("/api/token", json={"workflow": "tutor"}).json()["token"] for _ in range(5)}

    assert len(tokens) == 5


def test_the_mint_uses_the_api_key_and_the_configured_ttl(guest: httpx.Client, upstream: EmulatorControl) -> None:
    short = guest.post("/api/token", json={"workflow": "tutor", "ttl": 5})
    clamped = guest.post("/api/token", json={"workflow": "tutor", "ttl": 10_000})

    assert short.json()["ttl"] == 5
    assert clamped.json()["ttl"] == 60
    mints = upstream.requests("mint")
    assert [m["query"]["ttl"] for m in mints] == ["5", "60"]
    assert all(m["headers"]["authorization"] == f"Bearer {TEST_API_KEY}" for m in mints)
    assert all("cookie" not in m["headers"] and "x-csrf" not in m["headers"] for m in mints)


def test_minting_needs_a_session(anonymous: httpx.Client, upstream: EmulatorControl) -> None:
    response = anonymous.post("/api/token", json={"workflow": "tutor"})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert upstream.requests("mint") == []


def test_minting_an_unknown_workflow_is_refused_before_the_upstream_is_asked(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    for body in ({"workflow": "nope"}, {"workflow": "nope", "ttl": 0}):  # looked up before the ttl is judged
        response = guest.post("/api/token", json=body)

        assert response.status_code == 404, body
        assert response.json()["error"]["code"] == "unknown_workflow"
    assert upstream.requests("mint") == []


def test_mint_body_is_validated(guest: httpx.Client) -> None:
    for body in (
        {},
        {"workflow": 3},
        {"workflow": "tutor", "ttl": 0},
        {"workflow": "tutor", "ttl": "5"},
        {"workflow": "tutor", "extra": 1},
    ):
        response = guest.post("/api/token", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["code"] == "invalid_input"


def test_expires_at_counts_from_before_the_mint_not_from_its_answer(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    """The upstream starts the TTL when it mints; a slow answer must not make the token look younger."""
    upstream.fault(op="mint", stall=1.5)
    asked_at = time.time()

    body = guest.post("/api/token", json={"workflow": "tutor"}).json()

    expires_at = datetime.fromisoformat(body["expires_at"]).timestamp()
    ttl = int(upstream.requests("mint")[0]["query"]["ttl"])  # as granted: the emulator grants what is asked
    assert expires_at <= asked_at + ttl + 0.5  # not asked_at + 1.5 + ttl
