"""Session hardening (CONTRACT B1, bff-security R1-R9, R25, R27): cookie attributes, key rotation,
revocation, fixation, timeouts, ending running relays on logout, and the audit log."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from proxy.audit import AuditLog
from proxy.sessions import session_key
from tests.identity import AUDIENCE, ISSUER, JWT_SECRET, PASSWORD, cookie_for, hs256, session_id_of, write_users
from tests.servers import SESSION_SECRET, EmulatorControl, ServerProcess, browser, eventually, start_proxy

NEW_SECRET = "rotated-in-session-secret-f42546d5ecdd452509808b2d6d0413b5a738c70a"
RETIRED_SECRET = "retired-session-secret-5b720147b6918dfc19baa0d7767cab75b76e1799"
COOKIE = "bff_session"
# Expiry is clock-driven: there is no event to await for time passing, so those tests poll.
EXPIRY_WAIT_SECONDS = 15.0


@pytest.fixture(scope="module")
def hardened(emulator: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Every sign-in method on, and a rotation in progress: NEW signs, the test suite's usual key still verifies."""
    users = write_users(tmp_path_factory.mktemp("users") / "users.json", {"alice": PASSWORD})
    server = start_proxy(
        emulator.url,
        BFF_AUTH="guest,jwt,password",
        BFF_JWT_SECRET=JWT_SECRET,
        BFF_JWT_ISSUER=ISSUER,
        BFF_JWT_AUDIENCE=AUDIENCE,
        BFF_USERS_FILE=str(users),
        BFF_SESSION_SECRETS=f"{NEW_SECRET},{SESSION_SECRET}",
    )
    yield server
    server.stop()


@contextmanager
def signed_in(url: str, sub: str) -> Iterator[httpx.Client]:
    """A browser signed in through the identity-provider exchange as `sub`."""
    with browser(url) as client:
        client.post("/auth/exchange", headers={"Authorization": f"Bearer {hs256(sub=sub)}"}).raise_for_status()
        yield client


def with_cookie(url: str, value: str, name: str = COOKIE) -> httpx.Client:
    return browser(url, headers={"Cookie": f"{name}={value}"})


def audit_entries(server: ServerProcess) -> list[dict[str, Any]]:
    return [entry for entry in server.log_entries() if "audit" in entry]


def test_the_session_cookie_has_exactly_the_contract_attributes(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_COOKIE_SECURE="true")
    try:
        response = httpx.post(server.url + "/auth/guest", headers={"X-CSRF": "1"})
        [set_cookie] = response.headers.get_list("set-cookie")
        name_value, *attributes = [part.strip() for part in set_cookie.split(";")]
        name, value = name_value.split("=", 1)
        check = httpx.get(server.url + "/auth/session", headers={"Cookie": f"{name}={value}"})
    finally:
        server.stop()

    assert name == "__Host-bff_session"
    assert {attribute.lower() for attribute in attributes} == {
        "httponly",
        "secure",
        "samesite=strict",
        "path=/",
        "max-age=86400",
    }
    assert len(set_cookie.encode()) <= 1024
    # The value is an opaque signed id: no user id, no kind, nothing readable.
    assert response.json()["user"]["id"] not in value and "guest" not in value
    assert check.status_code == 200
    assert response.headers["strict-transport-security"].startswith("max-age=")


def test_a_tampered_cookie_is_refused_and_cleared(hardened: ServerProcess) -> None:
    with browser(hardened.url) as client:
        client.post("/auth/guest").raise_for_status()
        value = client.cookies[COOKIE]
    # Change the signature's second-to-last character: the last one of a 20-byte HMAC in base64url
    # carries only 4 bits, so swapping it can decode to the very same signature.
    flipped = "A" if value[-2] != "A" else "B"
    forged = [value[:-2] + flipped + value[-1], value[:20], value + "x", "x" * 2000]

    for cookie in forged:
        with with_cookie(hardened.url, cookie) as replay:
            response = replay.get("/auth/session")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
        assert "clear-site-data" not in response.headers  # only our cookie goes, not the site's
        assert "max-age=0" in response.headers["set-cookie"].lower()


def test_a_cookie_signed_with_a_retired_key_is_refused(hardened: ServerProcess) -> None:
    with browser(hardened.url) as client:
        client.post("/auth/guest").raise_for_status()
        session_id = session_id_of(client.cookies[COOKIE], NEW_SECRET)

    # Same live session id, signed with a key that is no longer in BFF_SESSION_SECRETS.
    with with_cookie(hardened.url, cookie_for(session_id, RETIRED_SECRET)) as replay:
        assert replay.get("/auth/session").status_code == 401
    with with_cookie(hardened.url, cookie_for(session_id, NEW_SECRET)) as genuine:
        assert genuine.get("/auth/session").status_code == 200


def test_a_rotated_key_still_verifies_cookies_it_signed(hardened: ServerProcess) -> None:
    """A cookie issued before the rotation (signed with the now second key) keeps its session."""
    with browser(hardened.url) as client:
        client.post("/auth/guest").raise_for_status()
        issued = client.cookies[COOKIE]
        user = client.get("/auth/session").json()["user"]

    session_id = session_id_of(issued, NEW_SECRET)  # the newest key signs
    with pytest.raises(Exception, match="Signature"):
        session_id_of(issued, SESSION_SECRET)
    with with_cookie(hardened.url, cookie_for(session_id, SESSION_SECRET)) as before_rotation:
        response = before_rotation.get("/auth/session")
    assert response.status_code == 200
    assert response.json()["user"] == user


def test_a_cookie_replayed_after_logout_is_refused(hardened: ServerProcess) -> None:
    with browser(hardened.url) as client:
        client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        stolen = client.cookies[COOKIE]

        logout = client.post("/auth/logout")

    assert logout.status_code == 204
    assert logout.headers["cache-control"] == "no-store"
    assert logout.headers["clear-site-data"] == '"cookies"'
    assert "max-age=0" in logout.headers["set-cookie"].lower()
    with with_cookie(hardened.url, stolen) as replay:
        assert replay.get("/auth/session").status_code == 401
        assert replay.post("/api/token", json={"workflow": "tutor"}).status_code == 401


def test_logout_all_ends_every_session_of_the_user_and_only_theirs(hardened: ServerProcess) -> None:
    with (
        signed_in(hardened.url, "mallory-victim") as laptop,
        signed_in(hardened.url, "mallory-victim") as phone,
        signed_in(hardened.url, "bystander") as someone_else,
    ):
        stolen = phone.cookies[COOKIE]

        response = laptop.post("/auth/logout-all")

        assert response.status_code == 204
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["clear-site-data"] == '"cookies"'
        assert laptop.get("/auth/session").status_code == 401
        assert phone.get("/auth/session").status_code == 401
        assert someone_else.get("/auth/session").status_code == 200
    with with_cookie(hardened.url, stolen) as replay:
        assert replay.get("/auth/session").status_code == 401


def test_logout_all_needs_a_session(hardened: ServerProcess) -> None:
    with browser(hardened.url) as client:
        response = client.post("/auth/logout-all")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_a_cookie_planted_before_sign_in_does_not_survive_it(hardened: ServerProcess) -> None:
    """Session fixation: an attacker's own cookie, planted in the victim's browser, must not become the
    victim's session when the victim signs in."""
    with browser(hardened.url) as attacker:
        attacker.post("/auth/guest").raise_for_status()
        planted = attacker.cookies[COOKIE]

    with with_cookie(hardened.url, planted) as victim:
        response = victim.post("/auth/login", json={"username": "alice", "password": PASSWORD})
        issued = response.cookies[COOKIE]

    assert response.status_code == 200
    assert issued != planted
    assert session_id_of(issued, NEW_SECRET) != session_id_of(planted, NEW_SECRET)
    with with_cookie(hardened.url, planted) as attacker_again:
        assert attacker_again.get("/auth/session").status_code == 401
    with with_cookie(hardened.url, issued) as victim_again:
        assert victim_again.get("/auth/session").json()["user"]["id"] == "alice"


def test_an_idle_session_expires_and_polling_the_session_does_not_extend_it(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_SESSION_IDLE_SECONDS="1")
    try:
        with browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()
            # Only GET /auth/session, which must not count as activity.
            eventually(lambda: client.get("/auth/session").status_code == 401, "the idle timeout", EXPIRY_WAIT_SECONDS)
        revoked = server.wait_for_log(lambda e: e.get("audit") == "session.revoked")
    finally:
        server.stop()

    assert revoked["reason"] == "expired_idle"


def test_an_active_session_still_ends_at_its_absolute_timeout(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_SESSION_IDLE_SECONDS="60", BFF_SESSION_MAX_SECONDS="2")
    try:
        cookie = httpx.post(server.url + "/auth/guest", headers={"X-CSRF": "1"}).cookies[COOKIE]
        # Sent by hand: a cookie jar would drop the cookie at its Max-Age, and the server must end the
        # session on its own. Each request counts as activity (an unknown workflow: 404 after the session check).
        with with_cookie(server.url, cookie) as client:
            assert client.post("/api/token", json={"workflow": "nope"}).status_code == 404
            eventually(
                lambda: client.post("/api/token", json={"workflow": "nope"}).status_code == 401,
                "the absolute timeout",
                EXPIRY_WAIT_SECONDS,
            )
            assert client.get("/auth/session").status_code == 401
    finally:
        server.stop()


def test_logout_ends_the_sessions_running_relay(hardened: ServerProcess, upstream: EmulatorControl) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", hold_after=2)
    with (
        signed_in(hardened.url, "streamer") as client,
        client.stream("POST", "/api/workflows/tutor/stream", json={"topic": "logout"}) as response,
    ):
        chunks = response.iter_raw()
        assert next(chunks)
        upstream.wait(kind="stream_start")

        assert client.post("/auth/logout").status_code == 204

        # A plain-text stream has no in-band error: the relay drops the connection mid-body.
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                pass
    upstream.wait(kind="stream_end", reason="cancelled")
    end = hardened.wait_for_log(lambda e: e.get("audit") == "relay.end" and e.get("user") == "jwt:streamer")
    assert end["end"] == "revoked"


def test_logout_all_ends_relays_of_the_users_other_sessions_even_before_their_first_byte(
    hardened: ServerProcess, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=30)
    with (
        signed_in(hardened.url, "two-devices") as laptop,
        signed_in(hardened.url, "two-devices") as phone,
        ThreadPoolExecutor(1) as pool,
    ):
        waiting = pool.submit(phone.post, "/api/workflows/tutor/stream", json={"topic": "x"})
        upstream.wait(kind="stream_start")

        assert laptop.post("/auth/logout-all").status_code == 204

        response = waiting.result(timeout=20)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    upstream.wait(kind="stream_end", reason="cancelled")


def test_logout_cancels_a_running_non_streaming_run(hardened: ServerProcess, upstream: EmulatorControl) -> None:
    upstream.fault(op="run", workflow="wf_tutor", stall=30)
    with signed_in(hardened.url, "runner") as client, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.post, "/api/workflows/tutor/run", json={"topic": "x"})
        eventually(lambda: upstream.requests("run"), "the run reached the upstream", EXPIRY_WAIT_SECONDS)

        assert client.post("/auth/logout").status_code == 204

        response = waiting.result(timeout=20)
    assert response.status_code == 401
    end = hardened.wait_for_log(lambda e: e.get("audit") == "relay.end" and e.get("user") == "jwt:runner")
    assert end["end"] == "revoked"


@pytest.mark.parametrize("path", ["/api/workflows/tutor/stream", "/api/workflows/tutor/run"])
def test_a_logout_while_the_request_body_is_arriving_stops_the_relay_before_anything_is_spent(
    hardened: ServerProcess, upstream: EmulatorControl, path: str
) -> None:
    """The session is checked as the request starts, but a relay registers (and so can be stopped by a
    logout) only once its body has arrived and it was admitted; a logout in between must count too."""
    with signed_in(hardened.url, "slow-uploader") as client, browser(hardened.url, cookies=client.cookies) as other:

        def body() -> Iterator[bytes]:
            yield b'{"topic": '
            assert other.post("/auth/logout").status_code == 204  # the first half has been sent
            yield b'"late"}'

        response = client.post(path, content=body(), headers={"Content-Type": "application/json"})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert upstream.requests() == []  # no token minted, nothing run


def test_the_audit_log_follows_a_session_by_hash_only(hardened: ServerProcess, upstream: EmulatorControl) -> None:
    with browser(hardened.url) as client:
        client.post("/auth/guest").raise_for_status()
        first = client.cookies[COOKIE]
        client.post("/auth/login", json={"username": "alice", "password": PASSWORD}).raise_for_status()
        second = client.cookies[COOKIE]
        client.post("/api/token", json={"workflow": "tutor"}).raise_for_status()
        client.post("/api/workflows/tutor/stream", json={"topic": "audit"}).raise_for_status()
        client.post("/auth/logout").raise_for_status()
    raw_ids = [session_id_of(cookie, NEW_SECRET) for cookie in (first, second)]
    keys = [session_key(session_id) for session_id in raw_ids]
    # The hash is keyed with the newest signing key, so the test, holding that key, can recompute it.
    guest_hash, alice_hash = (AuditLog(NEW_SECRET).sid_hash(key) for key in keys)
    for event in ("relay.end", "session.revoked"):
        hardened.wait_for_log(lambda e, event=event: e.get("audit") == event and e["sid_hash"] == alice_hash)

    guest = [e for e in audit_entries(hardened) if e["sid_hash"] == guest_hash]
    alice = [e for e in audit_entries(hardened) if e["sid_hash"] == alice_hash]
    assert [(e["audit"], e.get("reason")) for e in guest] == [
        ("session.created", None),
        ("session.revoked", "replaced"),
    ]
    events = [e["audit"] for e in alice]
    assert events[:3] == ["session.renewed", "token.minted", "relay.start"]
    assert sorted(events[3:]) == ["relay.end", "session.revoked"]
    renewed, minted, started = alice[:3]
    assert renewed["previous_sid_hash"] == guest_hash and renewed["kind"] == "password" and renewed["user"] == "alice"
    assert minted["workflow"] == "tutor" and started["relay"] == "stream:tutor"
    assert next(e for e in alice if e["audit"] == "relay.end")["end"] == "complete"
    assert next(e for e in alice if e["audit"] == "session.revoked")["reason"] == "logout"
    assert all(e["client_ip"] == "127.0.0.1" for e in guest + alice if e["audit"].startswith("session"))
    logs = "\n".join(hardened.logs)
    for secret in [*raw_ids, *keys, first, second]:
        assert secret not in logs


def test_the_cookie_name_and_path_cannot_be_confused_by_a_lookalike(hardened: ServerProcess) -> None:
    with browser(hardened.url) as client:
        client.post("/auth/guest").raise_for_status()
        value = client.cookies[COOKIE]
    for name in ("Bff_session", "__Host-bff_session", "bff_session_old"):
        with with_cookie(hardened.url, value, name=name) as other:
            assert other.get("/auth/session").status_code == 401


def _session_check(proxy: ServerProcess, cookie_header: bytes) -> int:
    """GET /auth/session with exactly this Cookie header, bytes as written (httpx would re-encode)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"GET /auth/session HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n".encode()
            + b"Cookie: "
            + cookie_header
            + b"\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_the_session_cookie_is_matched_by_its_exact_name_and_a_second_one_voids_both(
    proxy: ServerProcess, guest: httpx.Client
) -> None:
    value = guest.cookies["bff_session"].encode()

    assert _session_check(proxy, b"bff_session=" + value) == 200
    assert _session_check(proxy, b"theme=dark;  bff_session=" + value + b"; lang=en") == 200
    # A name with other whitespace around it is another cookie (a published __Host- prefix bypass).
    # (Headers arrive as latin-1: \xa0 is a no-break space, \x85 a next-line, both whitespace to Python.)
    for name in (b"\xa0bff_session", b"bff_session\xa0", b"\x85bff_session", b"\xc2\xa0bff_session"):
        assert _session_check(proxy, name + b"=" + value) == 401, name
    # Two cookies of our exact name: one of them was planted, so neither opens the session.
    assert _session_check(proxy, b"bff_session=" + value + b"; bff_session=planted") == 401
