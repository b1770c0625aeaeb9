"""Sign-in with OpenID Connect (CONTRACT C2), against a real provider: panva's oidc-provider.

One provider (tests/oidc_idp.py) and one BFF with `BFF_AUTH=oidc,guest` per module; each test signs in
a browser of its own (an httpx client walking the provider's login and consent pages).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import jwt
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.auth.oidc import accepted_issuers
from tests.conftest import require_tool
from tests.oidc_idp import CLIENT_ID, CLIENT_SECRET, Idp, idp_port, running_idp, sign_in_at_idp
from tests.servers import EmulatorControl, RedisServer, ServerProcess, browser, eventually, free_port, proxy_env
from tests.test_chat_node import NODE_DIR, node_binary, require_node_modules
from tests.test_chat_protocols import sse_events, text_of
from tests.test_runs import EXPECTED, INPUTS, STREAM, chat_body
from tests.test_user_sessions import cli


@dataclass
class OidcSetup:
    bffs: list[ServerProcess]
    idp: Idp

    @property
    def bff(self) -> ServerProcess:
        return self.bffs[0]


def oidc_env(issuer: str, public_url: str, **overrides: str) -> dict[str, str]:
    return {
        "BFF_AUTH": "oidc,guest",
        "BFF_OIDC_ISSUER": issuer,
        "BFF_OIDC_CLIENT_ID": CLIENT_ID,
        "BFF_OIDC_CLIENT_SECRET": CLIENT_SECRET,
        "BFF_PUBLIC_URL": public_url,
        # A refresh token, which this provider issues only for offline_access asked with prompt=consent.
        "BFF_OIDC_SCOPES": "openid profile email offline_access",
        "BFF_OIDC_AUTH_PARAMS": "prompt=consent",
        **overrides,
    }


@contextmanager
def oidc_setup(
    upstream_url: str,
    replicas: int = 1,
    *,
    backchannel_to: int = 0,
    access_token_ttl: int = 30,
    client_jwks: dict[str, Any] | None = None,
    **env: str,
) -> Iterator[OidcSetup]:
    """A provider and `replicas` BFFs registered with it (the first one's URL is the public URL: all
    replicas stand behind one address, as behind a load balancer; the provider's back-channel calls
    reach replica `backchannel_to`). Ports are chosen up front: each side must be configured with the
    other's address. With `client_jwks` the provider knows the client by those public keys only
    (private_key_jwt), and the BFFs get no client secret."""
    require_node_modules(NODE_DIR)
    port, bff_ports = idp_port(), [free_port() for _ in range(replicas)]
    public_url = f"http://127.0.0.1:{bff_ports[0]}"
    issuer = f"http://localhost:{port}"
    bff_env = proxy_env(upstream_url, **oidc_env(issuer, public_url, **env))
    if client_jwks is not None:
        del bff_env["BFF_OIDC_CLIENT_SECRET"]
    servers: list[ServerProcess] = []
    try:
        for bff_port in bff_ports:
            servers.append(ServerProcess(["serve"], bff_env, port=bff_port).start())
        backchannel = f"http://127.0.0.1:{bff_ports[backchannel_to]}/auth/backchannel-logout"
        config: dict[str, Any] = {"backchannelUri": backchannel, "accessTokenTtl": access_token_ttl}
        if client_jwks is not None:
            config["clientJwks"] = client_jwks
        with running_idp(node_binary(), str(NODE_DIR), public_url, port, **config) as idp:
            assert idp.issuer == issuer
            yield OidcSetup(servers, idp)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def oidc(emulator: ServerProcess) -> Iterator[OidcSetup]:
    with oidc_setup(emulator.url) as setup:
        yield setup


def start_login(client: httpx.Client, return_to: str = "/") -> httpx.Response:
    answer = client.get("/auth/login", params={"returnTo": return_to})
    assert answer.status_code == 302, answer.text
    return answer


def sign_in(oidc: OidcSetup, client: httpx.Client, *, login: str = "alice", return_to: str = "/") -> httpx.Response:
    """The whole login: the BFF's redirect, the provider's pages, the callback. Returns the callback's answer."""
    location = start_login(client, return_to).headers["location"]
    with httpx.Client(timeout=30.0) as idp_browser:
        callback = sign_in_at_idp(idp_browser, location, oidc.bff.url, login=login)
    return client.get(callback)


def signed_in(oidc: OidcSetup, client: httpx.Client, *, login: str = "alice") -> str:
    """Signs `client` in; returns the refresh token the provider issued for this sign-in."""
    before = len(oidc.idp.tokens("refresh_token"))
    assert sign_in(oidc, client, login=login).status_code == 200
    # The provider's lines reach the test through its stdout, a moment after its answers.
    issued = eventually(lambda: oidc.idp.tokens("refresh_token")[before:], "the sign-in's refresh token, logged")
    assert len(issued) == 1
    return issued[0]


def refresh_at_idp(oidc: OidcSetup, refresh_token: str) -> httpx.Response:
    """What the provider answers to this refresh token now (rotating it, when it is still good)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    return httpx.post(f"{oidc.idp.issuer}/token", data=data, auth=(CLIENT_ID, CLIENT_SECRET), timeout=10.0)


def revoked(oidc: OidcSetup, refresh_token: str) -> bool:
    answer = refresh_at_idp(oidc, refresh_token)
    assert answer.status_code in (200, 400), answer.text
    return answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def callback_with(client: httpx.Client, location: str, **params: str) -> httpx.Response:
    """The callback as if the provider sent the browser back with `params` for the login at `location`."""
    state = parse_qs(urlsplit(location).query)["state"][0]
    return client.get("/auth/callback", params={"state": state, **params})


# Signing in


def test_a_browser_signs_in_at_the_provider_and_lands_where_it_started(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        guest_cookie = client.post("/auth/guest").cookies["bff_session"]
        login = start_login(client, "/chat?topic=fractions")
        location = urlsplit(login.headers["location"])
        query = parse_qs(location.query)
        assert f"{location.scheme}://{location.netloc}" == oidc.idp.issuer
        assert query["code_challenge_method"] == ["S256"] and query["code_challenge"] and query["nonce"]
        assert query["redirect_uri"] == [f"{oidc.bff.url}/auth/callback"]
        login_cookie = login.headers["set-cookie"]
        assert login_cookie.startswith("bff_oidc_") and "HttpOnly" in login_cookie and "SameSite=lax" in login_cookie
        assert query["state"][0] not in login_cookie  # sealed, not only signed

        with httpx.Client(timeout=30.0) as idp_browser:
            callback = sign_in_at_idp(idp_browser, login.headers["location"], oidc.bff.url)
        landed = client.get(callback)

        assert landed.status_code == 200
        assert 'content="0;url=/chat?topic=fractions"' in landed.text
        assert landed.headers["cache-control"] == "no-store"
        session = client.get("/auth/session").json()
        assert session["user"] == {"id": "oidc:alice", "kind": "oidc", "name": "Test alice"}
        assert session["method"] == "oidc"
        # The guest session the browser had is over: a new session id at sign-in, the old one refused.
        replayed = httpx.get(f"{oidc.bff.url}/auth/session", cookies={"bff_session": guest_cookie})
        assert replayed.status_code == 401
        # No token reached the browser: only the session cookie.
        eventually(lambda: oidc.idp.tokens("access_token") and oidc.idp.tokens("refresh_token"), "tokens, logged")
        for token in oidc.idp.tokens("access_token") + oidc.idp.tokens("refresh_token"):
            assert token not in landed.text and token not in str(session)
        assert "eyJ" not in landed.text + str(landed.headers) + str(session)


def test_chromium_signs_in_on_the_providers_pages_and_lands_signed_in(oidc: OidcSetup) -> None:
    config = {"url": oidc.bff.url, "chromium": require_tool("chromium")}
    result = subprocess.run(
        [node_binary(), "oidc-browser.mjs", json.dumps(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    report = json.loads(result.stdout or "{}")
    assert "error" not in report and result.returncode == 0, result.stdout + result.stderr

    assert report["loginPage"] == urlsplit(oidc.idp.issuer).netloc
    # Landed on returnTo with the new session: the Strict session cookie came along after the callback.
    assert report["session"]["user"] == {"id": "oidc:alice", "kind": "oidc", "name": "Test alice"}
    # The browser holds the session cookie and nothing else of ours (the login cookie is used up).
    assert [cookie["name"] for cookie in report["cookies"]] == ["bff_session"]
    assert report["cookies"][0]["httpOnly"] and report["cookies"][0]["sameSite"] == "Strict"
    # Signed out at both ends: the provider's logout page sent the browser back to the app.
    assert report["logoutStatus"] == 200 and report["afterLogout"] == 401
    assert report["cancelled"] == "/?auth_error=access_denied"
    assert report["cancelledSession"] == 401


def test_a_callback_whose_state_differs_from_the_login_cookie_signs_nobody_in(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]
        state = parse_qs(urlsplit(location).query)["state"][0]

        answer = client.get("/auth/callback", params={"state": state[:-2] + "xx", "code": "c", "iss": oidc.idp.issuer})

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_expired"
        assert "bff_session" not in client.cookies
        assert client.get("/auth/session").status_code == 401


def test_a_callback_in_another_browser_than_the_login_signs_nobody_in(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]
        with httpx.Client(timeout=30.0) as idp_browser:
            callback = sign_in_at_idp(idp_browser, location, oidc.bff.url)
    with browser(oidc.bff.url) as victim:  # login CSRF: the attacker's callback URL, another browser
        answer = victim.get(callback)

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_expired"
        assert victim.get("/auth/session").status_code == 401


def test_an_id_token_with_another_nonce_is_refused(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        parts = urlsplit(start_login(client).headers["location"])
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        query["nonce"] = "another-nonce"
        with httpx.Client(timeout=30.0) as idp_browser:
            callback = sign_in_at_idp(idp_browser, urlunsplit(parts._replace(query=urlencode(query))), oidc.bff.url)

        answer = client.get(callback)

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_failed"
        assert client.get("/auth/session").status_code == 401


def test_a_replayed_authorization_code_signs_nobody_in_again(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]
        login_cookies = dict(client.cookies)
        with httpx.Client(timeout=30.0) as idp_browser:
            callback = sign_in_at_idp(idp_browser, location, oidc.bff.url)
        assert client.get(callback).status_code == 200
    with browser(oidc.bff.url, cookies=login_cookies) as replay:  # the login cookie kept, and the code
        answer = replay.get(callback)

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_failed"
        assert replay.get("/auth/session").status_code == 401


def test_an_id_token_with_a_forged_payload_is_refused(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]
        with httpx.Client(timeout=30.0) as idp_browser:
            callback = sign_in_at_idp(idp_browser, location, oidc.bff.url)
        assert oidc.idp.control("tamper").status_code == 204

        answer = client.get(callback)

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_failed"
        assert client.get("/auth/session").status_code == 401


def test_a_refusal_at_the_provider_comes_back_as_its_error_code(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]

        answer = callback_with(client, location, error="access_denied", iss=oidc.idp.issuer)
        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=access_denied"

        location = start_login(client).headers["location"]
        odd = callback_with(client, location, error="<script>", error_description="x", iss=oidc.idp.issuer)
        assert odd.status_code == 303 and odd.headers["location"] == "/?auth_error=login_failed"


def test_an_answer_naming_another_issuer_is_refused(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        location = start_login(client).headers["location"]

        answer = callback_with(client, location, code="c", iss="https://evil.example")

        assert answer.status_code == 303 and answer.headers["location"] == "/?auth_error=login_failed"


@pytest.mark.parametrize(
    "return_to", ["//evil.example", "https://evil.example", "/\\evil.example", "javascript:alert(1)", "chat", "/a\nb"]
)
def test_return_to_must_be_a_path_on_this_site(oidc: OidcSetup, return_to: str) -> None:
    with browser(oidc.bff.url) as client:
        answer = client.get("/auth/login", params={"returnTo": return_to})

        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_input"
        assert "location" not in answer.headers


def test_sign_in_answers_503_while_the_provider_cannot_be_reached(emulator: ServerProcess) -> None:
    port = free_port()
    env = oidc_env(f"http://localhost:{free_port()}", f"http://127.0.0.1:{port}")
    server = ServerProcess(["serve"], proxy_env(emulator.url, **env), port=port).start()
    try:
        with browser(server.url) as client:
            answer = client.get("/auth/login")

            assert answer.status_code == 503 and answer.json()["error"]["code"] == "auth_unavailable"
            assert client.post("/auth/guest").status_code == 200  # the other sign-ins go on working
    finally:
        server.stop()


def test_the_openapi_document_lists_the_sign_in_routes(oidc: OidcSetup) -> None:
    paths = httpx.get(f"{oidc.bff.url}/openapi.json").json()["paths"]

    assert "get" in paths["/auth/login"] and "get" in paths["/auth/callback"]
    assert "post" in paths["/auth/guest"]


# Signing out


def test_logout_answers_the_providers_logout_url_and_revokes_the_refresh_token(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        refresh_token = signed_in(oidc, client)

        answer = client.post("/auth/logout")

        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        logout_url = urlsplit(answer.json()["logout_url"])
        query = parse_qs(logout_url.query)
        assert f"{logout_url.scheme}://{logout_url.netloc}{logout_url.path}" == f"{oidc.idp.issuer}/session/end"
        assert query["post_logout_redirect_uri"] == [f"{oidc.bff.url}/"] and query["client_id"] == [CLIENT_ID]
        assert query["id_token_hint"][0].startswith("eyJ")
        assert client.get("/auth/session").status_code == 401
        # Revoked at the provider once the answer was sent (the provider then refuses it).
        eventually(lambda: revoked(oidc, refresh_token), "the refresh token revoked at the provider")


def test_logout_all_revokes_the_refresh_token_of_every_session_of_the_user(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as laptop, browser(oidc.bff.url) as phone:
        on_laptop = signed_in(oidc, laptop, login="carol")
        on_phone = signed_in(oidc, phone, login="carol")

        answer = phone.post("/auth/logout-all")

        assert answer.status_code == 200 and "logout_url" in answer.json()
        assert laptop.get("/auth/session").status_code == 401
        eventually(lambda: revoked(oidc, on_laptop) and revoked(oidc, on_phone), "both refresh tokens revoked")


def test_a_guest_beside_oidc_signs_out_as_before(oidc: OidcSetup) -> None:
    with browser(oidc.bff.url) as client:
        client.post("/auth/guest").raise_for_status()

        answer = client.post("/auth/logout")

        assert answer.status_code == 204 and answer.content == b""


# Back-channel logout


@pytest.fixture(scope="module")
def oidc_replicas(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[OidcSetup]:
    """Two replicas sharing Redis; the provider's back-channel calls reach the second one."""
    with oidc_setup(emulator.url, replicas=2, backchannel_to=1, BFF_STORAGE_URL=redis_server.url) as setup:
        yield setup


def backchannel_logout(url: str, logout_token: str) -> httpx.Response:
    """As the provider's server calls it: a form, no cookie, no X-CSRF."""
    return httpx.post(f"{url}/auth/backchannel-logout", data={"logout_token": logout_token}, timeout=10.0)


def test_back_channel_logout_ends_the_session_on_every_replica(oidc_replicas: OidcSetup) -> None:
    first, second = oidc_replicas.bffs
    with browser(first.url) as client:
        signed_in(oidc_replicas, client, login="dave")
        with browser(second.url, cookies=dict(client.cookies)) as same_browser_on_second:
            assert same_browser_on_second.get("/auth/session").status_code == 200

            sent = oidc_replicas.idp.control("backchannel", sub="dave").json()

            assert sent["status"] == 200  # the second replica accepted the provider's logout token
            assert client.get("/auth/session").status_code == 401  # and the first one signed out
            assert same_browser_on_second.get("/auth/session").status_code == 401
        second.wait_for_log(lambda e: e.get("audit") == "session.revoked" and e.get("reason") == "idp_backchannel")


def _b64_json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def test_a_replayed_altered_or_foreign_logout_token_is_refused(oidc_replicas: OidcSetup) -> None:
    first, second = oidc_replicas.bffs
    with browser(first.url) as client:
        signed_in(oidc_replicas, client, login="erin")
        logout_token = oidc_replicas.idp.control("backchannel", sub="erin").json()["logout_token"]
        signed_in(oidc_replicas, client, login="erin")  # a new session of the same user
        header, payload, signature = logout_token.split(".")
        altered = ".".join([header, payload[:-3] + ("A" if payload[-3] != "A" else "B") + payload[-2:], signature])
        id_token = parse_qs(urlsplit(client.post("/auth/logout").json()["logout_url"]).query)["id_token_hint"][0]
        signed_in(oidc_replicas, client, login="erin")
        # A header whose alg is no string (an outsider's forgery): refused like any other, not a 500.
        unhashable_alg = ".".join([_b64_json({"alg": ["RS256"]}), _b64_json({}), "AA"])

        for token in (logout_token, altered, id_token, "not-a-jwt", unhashable_alg):
            for replica in (first, second):
                answer = backchannel_logout(replica.url, token)
                assert answer.status_code == 400, token
                assert answer.json()["error"]["code"] == "invalid_request"
        assert client.get("/auth/session").status_code == 200  # none of them ended the new session


def test_only_the_back_channel_route_is_exempt_from_the_browser_rules(oidc_replicas: OidcSetup) -> None:
    url = oidc_replicas.bff.url
    form = {"logout_token": "x"}

    assert httpx.post(f"{url}/auth/backchannel-logout", json=form).status_code == 422  # a form only
    assert httpx.post(f"{url}/auth/backchannel-logout", data={"logout_token": "x" * 20_000}).status_code == 413
    assert httpx.post(f"{url}/auth/logout", data=form).status_code == 403  # everything else: as before
    assert httpx.post(f"{url}/auth/guest", data=form, headers={"X-CSRF": "1"}).status_code == 422


# Refresh

ACCESS_TOKEN_TTL = 60
REFRESH_MARGIN = 52  # tokens fall due 8 s after each sign-in or refresh: a loaded machine signs in within that


@pytest.fixture(scope="module")
def oidc_refreshing(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[OidcSetup]:
    """Two replicas sharing Redis, whose sessions' provider tokens fall due 8 s after each refresh."""
    with oidc_setup(
        emulator.url,
        replicas=2,
        access_token_ttl=ACCESS_TOKEN_TTL,
        BFF_STORAGE_URL=redis_server.url,
        BFF_OIDC_REFRESH_MARGIN_SECONDS=str(REFRESH_MARGIN),
    ) as setup:
        yield setup


def until_due(signed_in_at: float) -> None:
    """Wait until the session's provider tokens are due for a refresh (a wait on the clock: refresh
    before expiry is a matter of time)."""
    due = signed_in_at + ACCESS_TOKEN_TTL - REFRESH_MARGIN + 0.2
    eventually(lambda: time.time() >= due, "the tokens falling due")


def test_provider_tokens_are_refreshed_before_they_expire_once_across_replicas(oidc_refreshing: OidcSetup) -> None:
    first, second = oidc_refreshing.bffs
    with browser(first.url) as on_first, browser(second.url) as on_second:
        signed_in_at = time.time()
        refresh_token = signed_in(oidc_refreshing, on_first, login="gina")
        on_second.cookies.update(dict(on_first.cookies))
        issued = len(oidc_refreshing.idp.tokens("refresh_token"))
        until_due(signed_in_at)

        # Six requests at once, on both replicas: one of them refreshes, the others wait or go on.
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda c: c.get("/auth/session").status_code, [on_first, on_second] * 3))

        assert statuses == [200] * 6
        # The provider's lines reach the test through its stdout, a moment after its answers.
        eventually(lambda: len(oidc_refreshing.idp.tokens("refresh_token")) > issued, "the refresh, logged")
        assert len(oidc_refreshing.idp.tokens("refresh_token")) == issued + 1  # exactly one refresh
        # The provider rotated the refresh token: the old one is spent (a second refresh would have
        # reused it and revoked the whole grant, signing the user out).
        assert revoked(oidc_refreshing, refresh_token)
        assert on_first.get("/auth/session").json()["user"]["id"] == "oidc:gina"


def test_a_refresh_the_provider_refuses_ends_the_session(oidc_refreshing: OidcSetup) -> None:
    first, _ = oidc_refreshing.bffs
    with browser(first.url) as client:
        signed_in_at = time.time()
        signed_in(oidc_refreshing, client, login="hank")
        assert oidc_refreshing.idp.control("disable", sub="hank").status_code == 204
        until_due(signed_in_at)

        assert client.get("/auth/session").status_code == 401
        assert client.get("/auth/session").status_code == 401  # the record is gone, not only refused once
        first.wait_for_log(lambda e: e.get("audit") == "session.revoked" and e.get("reason") == "idp_refresh_failed")


# Everything else, with OIDC users

DAILY_OUTPUT_CHARS = 1_000_000


@pytest.fixture(scope="module")
def oidc_limited(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[OidcSetup]:
    """One BFF on Redis with one stream per user and a daily output budget. Its provider tokens are
    not due for a refresh within a test (refreshing has tests of its own above)."""
    with oidc_setup(
        emulator.url,
        access_token_ttl=3600,
        BFF_STORAGE_URL=redis_server.url,
        BFF_MAX_CONCURRENT_STREAMS="1",
        BFF_DAILY_OUTPUT_CHARS=str(DAILY_OUTPUT_CHARS),
    ) as setup:
        yield setup


def used_today(client: httpx.Client) -> int:
    value: int = client.get("/auth/session").json()["limits"]["daily_output_chars"]["used"]
    return value


def relay_end(server: ServerProcess, run_id: str) -> dict[str, Any]:
    return server.wait_for_log(lambda e: e.get("audit") == "relay.end" and e.get("run_id") == run_id)


def test_an_oidc_user_chats_and_relays_under_their_own_stream_limit_and_budget(
    oidc_limited: OidcSetup, upstream: EmulatorControl, redis_server: RedisServer
) -> None:
    bff = oidc_limited.bff
    with browser(bff.url) as laptop, browser(bff.url) as phone, browser(bff.url) as jack:
        signed_in(oidc_limited, laptop, login="ivy")
        signed_in(oidc_limited, phone, login="ivy")  # another session of the same user
        signed_in(oidc_limited, jack, login="jack")
        upstream.fault(op="stream", workflow="wf_tutor", hold_after=1)  # ivy's chat answer, held open

        with laptop.stream("POST", "/api/chat/tutor", json=chat_body("oidc-chat")) as chat:
            assert chat.status_code == 200
            chat_run = chat.headers["x-run-id"]
            body = chat.iter_raw()
            head = next(body)
            # Her one stream is open: refused in her other session too (the limit is the user's), not for jack.
            refused = phone.post(STREAM, json=INPUTS)
            jacks = jack.post(STREAM, json=INPUTS)
            upstream.release()
            answer = text_of(sse_events((head + b"".join(body)).decode()))
        assert relay_end(bff, chat_run)["user"] == "oidc:ivy"
        relayed = phone.post(STREAM, json=INPUTS)  # her slot is free again
        assert relayed.status_code == 200
        assert relay_end(bff, relayed.headers["x-run-id"])["user"] == "oidc:ivy"
        assert relay_end(bff, jacks.headers["x-run-id"])["user"] == "oidc:jack"

        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_streams")
        assert "retry-after" in refused.headers
        assert (jacks.status_code, jacks.text) == (200, EXPECTED)
        assert answer == EXPECTED and relayed.text == EXPECTED
        # The budget is the user's: both of her sessions see both answers, jack only his.
        assert used_today(laptop) == used_today(phone) == 2 * len(EXPECTED)
        assert used_today(jack) == len(EXPECTED)
    with redis.Redis.from_url(redis_server.url) as storage:
        counters = {key.decode(): int(storage.get(key) or 0) for key in storage.scan_iter("*output:oidc:*")}
    assert {key.split(":output:")[1].rsplit(":", 1)[0]: value for key, value in counters.items()} == {
        "oidc:ivy": 2 * len(EXPECTED),
        "oidc:jack": len(EXPECTED),
    }


def test_operators_list_and_end_an_oidc_users_sessions_from_the_command_line(
    oidc_limited: OidcSetup, redis_server: RedisServer
) -> None:
    bff = oidc_limited.bff
    env = {**proxy_env("http://127.0.0.1:9"), "BFF_STORAGE_URL": redis_server.url}
    with browser(bff.url) as laptop, browser(bff.url) as phone, browser(bff.url) as bystander:
        signed_in(oidc_limited, laptop, login="kim")
        signed_in(oidc_limited, phone, login="kim")
        signed_in(oidc_limited, bystander, login="lee")

        listed = cli("sessions", "list", "--user", "oidc:kim", env=env)
        ended = cli("sessions", "revoke", "--user", "oidc:kim", env=env)

        assert listed.returncode == 0, listed.stderr
        rows = listed.stdout.strip().splitlines()
        assert len(rows) == 3 and all(row.endswith("  oidc") for row in rows[1:]), listed.stdout
        # Named as the audit log named them at sign-in.
        opened = {
            entry["sid_hash"]
            for entry in bff.log_entries()
            if entry.get("audit") == "session.created" and entry.get("user") == "oidc:kim"
        }
        assert {row.split()[0] for row in rows[1:]} == opened
        assert ended.returncode == 0, ended.stderr
        assert ended.stdout.strip() == "ended 2 session(s) of oidc:kim"
        assert laptop.get("/auth/session").status_code == 401
        assert phone.get("/auth/session").status_code == 401
        assert bystander.get("/auth/session").json()["user"]["id"] == "oidc:lee"  # nobody else's
        assert cli("sessions", "list", "--user", "oidc:kim", env=env).stdout.strip() == "oidc:kim has no session"


# private_key_jwt: the BFF authenticates to the provider with a signed assertion, no secret


def key_pair(alg: str) -> tuple[str, dict[str, Any]]:
    """A new private key (PEM) and its public JWK."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    return pem, jwk


def refresh_with_assertion(oidc: OidcSetup, refresh_token: str, pem: str, kid: str, alg: str) -> httpx.Response:
    """What the provider answers to this refresh token, the client authenticated as the BFF does."""
    now = int(time.time())
    claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": oidc.idp.issuer, "jti": uuid.uuid4().hex}
    assertion = jwt.encode({**claims, "iat": now, "exp": now + 60}, pem, algorithm=alg, headers={"kid": kid})
    data = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": CLIENT_ID,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    return httpx.post(f"{oidc.idp.issuer}/token", data=data, timeout=10.0)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_private_key_jwt_signs_in_refreshes_and_revokes_with_a_new_assertion_each_time(
    emulator: ServerProcess, tmp_path: Path, alg: str
) -> None:
    pem, jwk = key_pair(alg)
    kid = f"bff-{alg.lower()}"
    key_file = tmp_path / "oidc-client-key.pem"
    key_file.write_text(pem)
    jwks = {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": alg}]}
    env = {"BFF_OIDC_PRIVATE_KEY_FILE": str(key_file), "BFF_OIDC_PRIVATE_KEY_ID": kid}
    # Tokens live 30 s and are refreshed 60 s before they expire: the first request after sign-in refreshes.
    with oidc_setup(emulator.url, client_jwks=jwks, access_token_ttl=30, **env) as setup:
        # The provider knows no secret for this client: the secret the other tests use is refused.
        assert refresh_at_idp(setup, "x").json()["error"] == "invalid_client"
        # That refusal's line reaches the test a moment after the answer: it is not one of ours.
        eventually(lambda: any(line.get("error") for line in list(setup.idp.lines)), "the refusal, logged")
        ours = len(setup.idp.lines)
        with browser(setup.bff.url) as first, browser(setup.bff.url) as client:
            signed_in(setup, first, login="mia")
            signed_in(setup, client, login="mia")  # a second code exchange: a new jti, or the provider refuses it
            issued = len(setup.idp.tokens("refresh_token"))

            session = client.get("/auth/session")  # the tokens are due: refreshed, with another assertion

            assert session.status_code == 200 and session.json()["user"]["id"] == "oidc:mia"
            # Rotated by the refresh; the provider's lines reach the test a moment after its answers.
            eventually(lambda: len(setup.idp.tokens("refresh_token")) > issued, "the refresh, logged")
            assert len(setup.idp.tokens("refresh_token")) == issued + 1
            assert client.post("/auth/logout").status_code == 200
            errors = [line for line in setup.idp.lines[ours:] if line.get("error")]
            latest = setup.idp.tokens("refresh_token")[-1]  # the logout may have refreshed once more

            def latest_revoked() -> bool:
                answer = refresh_with_assertion(setup, latest, pem, kid, alg)
                assert answer.status_code in (200, 400), answer.text
                return answer.status_code == 400 and answer.json()["error"] == "invalid_grant"

            # Revoked at the provider (a revocation call, with one more assertion) once the answer was sent.
            eventually(latest_revoked, "the refresh token revoked at the provider")
        assert errors == [] and setup.idp.events("revocation.error") == []


@pytest.mark.parametrize(
    ("configured", "named", "accepted"),
    [
        ("https://accounts.google.com", "accounts.google.com", True),  # Google's other spelling
        ("https://accounts.google.com", "https://accounts.google.com", True),
        ("https://id.example.com", "id.example.com", False),  # nobody else's issuer loses its scheme
    ],
)
def test_an_id_token_issuer_must_be_the_configured_one_or_googles_other_spelling(
    configured: str, named: str, accepted: bool
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"iss": named, "aud": CLIENT_ID, "exp": time.time() + 60}, key, algorithm="RS256")

    def verified() -> bool:
        try:
            jwt.decode(token, key.public_key(), ["RS256"], audience=CLIENT_ID, issuer=accepted_issuers(configured))
        except jwt.InvalidIssuerError:
            return False
        return True

    assert verified() is accepted
