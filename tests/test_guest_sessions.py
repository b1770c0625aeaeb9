"""Guest sessions (CONTRACT B1): sign-in, session check, logout with server-side revocation."""

from __future__ import annotations

import httpx

from tests.servers import ServerProcess, browser, start_proxy

RUN = "/api/workflows/tutor/run"


def test_a_guest_sign_in_sets_a_session_cookie_and_describes_the_session(anonymous: httpx.Client) -> None:
    response = anonymous.post("/auth/guest")

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["user"]["kind"] == "guest"
    assert body["user"]["id"].startswith("guest_")
    assert set(body) == {"user", "method", "expires_at", "limits"}
    assert body["method"] == "guest"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("bff_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Domain" not in cookie
    assert anonymous.get("/auth/session").json() == body


def test_without_a_session_the_session_check_is_a_401(anonymous: httpx.Client) -> None:
    response = anonymous.get("/auth/session")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_a_cookie_replayed_after_logout_is_refused(proxy: ServerProcess, guest: httpx.Client) -> None:
    stolen = guest.cookies["bff_session"]

    logout = guest.post("/auth/logout")

    assert logout.status_code == 204
    assert logout.headers["clear-site-data"] == '"cookies"'
    with browser(proxy.url, cookies={"bff_session": stolen}) as replay:
        assert replay.get("/auth/session").status_code == 401
        assert replay.post("/api/token", json={"workflow": "tutor"}).status_code == 401


def test_signing_in_again_issues_a_new_session_id_and_ends_the_old_one(
    proxy: ServerProcess, guest: httpx.Client
) -> None:
    old = guest.cookies["bff_session"]

    guest.post("/auth/guest").raise_for_status()

    assert guest.cookies["bff_session"] != old
    assert guest.get("/auth/session").status_code == 200
    with browser(proxy.url, cookies={"bff_session": old}) as replay:
        assert replay.get("/auth/session").status_code == 401


def test_a_tampered_cookie_is_refused(proxy: ServerProcess, guest: httpx.Client) -> None:
    value = guest.cookies["bff_session"]
    # The second-to-last character: the last one of the signature carries only 4 bits in base64url.
    tampered = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]

    with browser(proxy.url, cookies={"bff_session": tampered}) as client:
        assert client.get("/auth/session").status_code == 401


def test_logout_needs_the_csrf_header(guest: httpx.Client) -> None:
    response = guest.post("/auth/logout", headers={"X-CSRF": ""})

    assert response.status_code == 403
    assert guest.get("/auth/session").status_code == 200


def test_guests_of_one_address_share_their_limits_unless_configured_otherwise(emulator: ServerProcess) -> None:
    """Ten guest sessions from one address must not hold ten times every per-user limit."""
    for setting, second_guest_allowed in (("ip", False), ("session", True)):
        server = start_proxy(emulator.url, BFF_RATE_LIMITS="relay=2/minute;login=100/minute", BFF_GUEST_LIMITS=setting)
        try:
            with browser(server.url) as first, browser(server.url) as second:
                first.post("/auth/guest").raise_for_status()
                second.post("/auth/guest").raise_for_status()
                assert [first.post(RUN, json={"message": "x"}).status_code for _ in range(2)] == [200, 200]
                third = second.post(RUN, json={"message": "x"})
        finally:
            server.stop()
        assert (third.status_code == 200) is second_guest_allowed, setting
        if not second_guest_allowed:
            assert third.json()["error"]["code"] == "rate_limited"
