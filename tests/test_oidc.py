"""Sign-in with OpenID Connect (CONTRACT C2), against a real provider: panva's oidc-provider.

One provider (tests/oidc_idp.py) and one BFF with `BFF_AUTH=oidc,guest` per module; each test signs in
a browser of its own (an httpx client walking the provider's login and consent pages).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from tests.conftest import require_tool
from tests.oidc_idp import CLIENT_ID, CLIENT_SECRET, Idp, idp_port, running_idp, sign_in_at_idp
from tests.servers import RedisServer, ServerProcess, browser, eventually, free_port, proxy_env
from tests.test_chat_node import NODE_DIR, node_binary, require_node_modules


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
    upstream_url: str, replicas: int = 1, *, backchannel_to: int = 0, access_token_ttl: int = 30, **env: str
) -> Iterator[OidcSetup]:
    """A provider and `replicas` BFFs registered with it (the first one's URL is the public URL: all
    replicas stand behind one address, as behind a load balancer; the provider's back-channel calls
    reach replica `backchannel_to`). Ports are chosen up front: each side must be configured with the
    other's address."""
    require_node_modules(NODE_DIR)
    port, bff_ports = idp_port(), [free_port() for _ in range(replicas)]
    public_url = f"http://127.0.0.1:{bff_ports[0]}"
    issuer = f"http://localhost:{port}"
    servers: list[ServerProcess] = []
    try:
        for bff_port in bff_ports:
            server = ServerProcess(
                ["serve"], proxy_env(upstream_url, **oidc_env(issuer, public_url, **env)), port=bff_port
            )
            servers.append(server.start())
        backchannel = f"http://127.0.0.1:{bff_ports[backchannel_to]}/auth/backchannel-logout"
        config = {"backchannelUri": backchannel, "accessTokenTtl": access_token_ttl}
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

        for token in (logout_token, altered, id_token, "not-a-jwt"):
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
REFRESH_MARGIN = 57  # tokens fall due 3 s after each sign-in or refresh


@pytest.fixture(scope="module")
def oidc_refreshing(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[OidcSetup]:
    """Two replicas sharing Redis, whose sessions' provider tokens fall due 3 s after each refresh."""
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
