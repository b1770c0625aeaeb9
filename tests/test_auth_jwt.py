"""`jwt` sign-in (CONTRACT B1): `POST /auth/exchange` with the app's identity-provider token.

A live proxy verifies HS256 tokens with a shared secret and RS256/ES256 tokens with keys from a real
JWKS endpoint; every forged, stale or misdirected token must be refused with 401 `unauthenticated`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from proxy.auth.jwt import JwksCache
from tests.identity import (
    AUDIENCE,
    ISSUER,
    JWT_SECRET,
    JwksServer,
    SigningKey,
    hmac_with,
    hs256,
    jwks_server,
    unsigned,
)
from tests.servers import ServerProcess, browser, start_proxy

RSA_KEY = SigningKey.rsa("rsa-1")
EC_KEY = SigningKey.ec("ec-1")


def jwt_settings(jwks: JwksServer, *, with_secret: bool = True) -> dict[str, str]:
    return {
        "BFF_AUTH": "jwt",
        "BFF_JWKS_URL": jwks.url,
        "BFF_JWT_ISSUER": ISSUER,
        "BFF_JWT_AUDIENCE": AUDIENCE,
        **({"BFF_JWT_SECRET": JWT_SECRET} if with_secret else {}),
    }


@pytest.fixture(scope="module")
def provider() -> Iterator[JwksServer]:
    with jwks_server(RSA_KEY, EC_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def jwt_proxy(emulator: ServerProcess, provider: JwksServer) -> Iterator[ServerProcess]:
    server = start_proxy(emulator.url, **jwt_settings(provider))
    yield server
    server.stop()


def exchange(url: str, token: str) -> httpx.Response:
    with browser(url) as client:
        return client.post("/auth/exchange", headers={"Authorization": f"Bearer {token}"})


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize(
    "token",
    [hs256(sub="alice"), RSA_KEY.sign(sub="alice"), EC_KEY.sign(sub="alice")],
    ids=["HS256-secret", "RS256-jwks", "ES256-jwks"],
)
def test_a_valid_token_becomes_a_session_for_its_subject(jwt_proxy: ServerProcess, token: str) -> None:
    with browser(jwt_proxy.url) as client:
        response = client.post("/auth/exchange", headers={"Authorization": f"Bearer {token}"})

        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.json()["user"] == {"id": "jwt:alice", "kind": "jwt"}
        assert client.get("/auth/session").json()["user"] == {"id": "jwt:alice", "kind": "jwt"}
    # The token is used once, here; the browser then holds only the cookie.
    assert token not in response.text and token not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (hs256(exp=int(time.time()) - 600), "ExpiredSignatureError"),
        (hs256(nbf=int(time.time()) + 600), "ImmatureSignatureError"),
        (hs256(iss="https://evil.example/"), "InvalidIssuerError"),
        (hs256(aud="someone-else"), "InvalidAudienceError"),
        (hs256(aud=None), "MissingRequiredClaimError"),
        (hs256(exp=None), "MissingRequiredClaimError"),
        (hs256(sub=None), "MissingRequiredClaimError"),
        (hs256(sub=""), "bad_sub"),
        (hs256(secret="another-secret-of-at-least-32-bytes-long"), "InvalidSignatureError"),
        (unsigned(), "algorithm_not_accepted"),
        # Algorithm confusion: HS256 "signed" with the provider's public key verifies only against the
        # HS256 secret, never against a JWKS key.
        (hmac_with(RSA_KEY.public_pem(), kid=RSA_KEY.kid), "InvalidSignatureError"),
        (SigningKey.rsa("rsa-unknown").sign(), "unknown_key"),
        # A known kid with the wrong key type or algorithm: the key decides the algorithm, not the token.
        (SigningKey("rsa-1", EC_KEY.private, "ES256").sign(), "InvalidAlgorithmError"),
        (SigningKey("ec-1", RSA_KEY.private, "RS256").sign(), "InvalidAlgorithmError"),
        ("not-a-jwt", "malformed"),
        ("e30.e30.AAAA", "algorithm_not_accepted"),  # header {}: no algorithm at all
        ("eyJhbGciOlsiSFMyNTYiXX0.e30.AAAA", "algorithm_not_accepted"),  # {"alg": ["HS256"]}
        ("eyJhbGciOnsiSFMyNTYiOjF9fQ.e30.AAAA", "algorithm_not_accepted"),  # {"alg": {"HS256": 1}}
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "wrong-issuer",
        "wrong-audience",
        "no-audience",
        "no-expiry",
        "no-subject",
        "empty-subject",
        "wrong-secret",
        "alg-none",
        "HS256-with-RSA-public-key",
        "unknown-key",
        "ES256-under-an-RSA-kid",
        "RS256-under-an-EC-kid",
        "not-a-jwt",
        "empty-header",
        "alg-a-list",
        "alg-an-object",
    ],
)
def test_a_bad_token_is_refused_by_the_check_meant_for_it(jwt_proxy: ServerProcess, token: str, reason: str) -> None:
    request_id = secrets.token_hex(8)
    with browser(jwt_proxy.url, headers={"X-Request-ID": request_id}) as client:
        assert_refused(client.post("/auth/exchange", headers={"Authorization": f"Bearer {token}"}))

    logged = jwt_proxy.wait_for_log(lambda e: e.get("request_id") == request_id and e["message"] == "jwt refused")
    assert logged["reason"] == reason


def test_hs256_signed_with_a_public_key_is_refused_when_only_jwks_is_configured(
    emulator: ServerProcess, provider: JwksServer
) -> None:
    """Algorithm confusion: with no HS256 secret configured, nothing may verify an HS256 token."""
    server = start_proxy(emulator.url, **jwt_settings(provider, with_secret=False))
    try:
        assert_refused(exchange(server.url, hmac_with(RSA_KEY.public_pem(), kid=RSA_KEY.kid)))
        assert_refused(exchange(server.url, hs256()))
        assert exchange(server.url, RSA_KEY.sign()).status_code == 200
    finally:
        server.stop()


def test_the_exchange_needs_a_bearer_token(jwt_proxy: ServerProcess) -> None:
    with browser(jwt_proxy.url) as client:
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
            assert_refused(client.post("/auth/exchange", headers=headers))


def test_the_exchange_needs_the_csrf_header(jwt_proxy: ServerProcess) -> None:
    response = httpx.post(jwt_proxy.url + "/auth/exchange", headers={"Authorization": f"Bearer {hs256()}"})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"


def test_a_jwks_key_rotation_is_picked_up_and_refreshes_are_rate_limited(emulator: ServerProcess) -> None:
    old, new = SigningKey.ec("2026-old"), SigningKey.ec("2026-new")
    with jwks_server(old) as rotating:
        server = start_proxy(emulator.url, **jwt_settings(rotating))
        try:
            assert exchange(server.url, old.sign()).status_code == 200
            assert rotating.fetches == 1

            rotating.keys = [new]  # the provider rotates: a kid we have not seen triggers one refetch
            assert exchange(server.url, new.sign()).status_code == 200
            assert rotating.fetches == 2

            # Made-up kids cannot make us hammer the provider: no refetch within the cooldown.
            for number in range(3):
                assert_refused(exchange(server.url, SigningKey.ec(f"made-up-{number}").sign()))
            assert rotating.fetches == 2
            # The retired key is gone from the refreshed set.
            assert_refused(exchange(server.url, old.sign()))
        finally:
            server.stop()


def test_an_unreachable_jwks_is_a_503_not_a_crash(emulator: ServerProcess) -> None:
    with jwks_server(RSA_KEY) as gone:
        url = gone.url
    server = start_proxy(emulator.url, BFF_AUTH="jwt", BFF_JWKS_URL=url)
    try:
        response = exchange(server.url, RSA_KEY.sign(iss=None, aud=None))

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "auth_unavailable"
        assert response.headers["retry-after"]
    finally:
        server.stop()


def test_a_stale_key_set_keeps_serving_while_a_hanging_refresh_runs_in_the_background(
    emulator: ServerProcess,
) -> None:
    key = SigningKey.ec("2026-a")
    with jwks_server(key) as provider:
        server = start_proxy(emulator.url, **jwt_settings(provider), BFF_JWKS_MAX_AGE_SECONDS="1")
        try:
            assert exchange(server.url, key.sign()).status_code == 200
            time.sleep(1.2)  # the key set goes stale: the age is the point here
            provider.mode = "hang"
            started = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda _: exchange(server.url, key.sign()).status_code, range(4)))
            took = time.monotonic() - started
        finally:
            server.stop()

    assert statuses == [200] * 4
    # One refresh was started (and hangs); no sign-in waited for it, let alone one after another, which
    # took 5, 10, 15 and 20 s before: all four are done well before a single fetch's 5 s timeout.
    assert provider.fetches == 2
    assert took < 4


def test_a_failing_key_set_backs_off_instead_of_being_fetched_for_every_junk_token(emulator: ServerProcess) -> None:
    key = SigningKey.ec("2026-a")
    with jwks_server(key) as provider:
        server = start_proxy(emulator.url, **jwt_settings(provider), BFF_JWKS_MAX_AGE_SECONDS="1")
        try:
            assert exchange(server.url, key.sign()).status_code == 200
            time.sleep(1.2)
            provider.mode = "fail"
            for number in range(6):
                assert_refused(exchange(server.url, SigningKey.ec(f"junk-{number}").sign()))
            still = exchange(server.url, key.sign())
        finally:
            server.stop()

    assert provider.fetches <= 3  # the first load, then at most the stale refresh and one kid refetch
    assert still.status_code == 200  # the keys it had keep working


# The key cache in-process: its HTTP client comes from its constructor, never from a request


@pytest.mark.anyio
async def test_the_key_cache_fetches_with_the_client_it_was_given_and_closes_it() -> None:
    fetched: list[httpx.Request] = []
    clients: list[httpx.AsyncClient] = []

    def provider(request: httpx.Request) -> httpx.Response:
        fetched.append(request)
        return httpx.Response(200, json={"keys": [RSA_KEY.jwk(), EC_KEY.jwk()]})

    def open_client() -> httpx.AsyncClient:
        clients.append(httpx.AsyncClient(transport=httpx.MockTransport(provider)))
        return clients[-1]

    cache = JwksCache("https://id.example.test/jwks.json", open_client=open_client)

    found = [await cache.key("rsa-1"), await cache.key("ec-1")]

    assert [key.algorithm_name for key in found if key is not None] == ["RS256", "ES256"]
    assert [str(request.url) for request in fetched] == ["https://id.example.test/jwks.json"]  # one fetch serves both
    assert [client.is_closed for client in clients] == [True]
