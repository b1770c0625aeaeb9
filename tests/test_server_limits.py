"""`serve` facing the network directly (issue 16): connections that never finish their request are
closed, request headers are capped, and the number of connections is bounded, over real sockets.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from tests.servers import EmulatorControl, ServerProcess, guest_of, start_proxy

PATIENCE = 10.0  # far above the 1 s limits set here: a connection still open then was never closed


@pytest.fixture(scope="module")
def strict(emulator: ServerProcess) -> Iterator[ServerProcess]:
    server = start_proxy(
        emulator.url, BFF_HEADER_TIMEOUT_SECONDS="1", BFF_BODY_TIMEOUT_SECONDS="1", BFF_MAX_HEADER_BYTES="8192"
    )
    yield server
    server.stop()


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(PATIENCE)
    return sock


def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sent until it closed the connection, and how long that took."""
    started, received = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


@pytest.mark.parametrize("part", ["nothing", "half-the-headers", "half-the-body"])
def test_a_connection_that_never_finishes_its_request_is_closed(strict: ServerProcess, part: str) -> None:
    with guest_of(strict.url) as client:
        cookie = client.cookies["bff_session"]
    sent = {
        "nothing": b"",
        "half-the-headers": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        # A route that reads its body (POST /api/token), which never comes whole.
        "half-the-body": b"POST /api/token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-CSRF: 1\r\nCookie: bff_session="
        + cookie.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"workflow": ',
    }[part]
    with connect(strict) as sock:
        sock.sendall(sent)
        received, waited = closed_after(sock)

    assert received == b""
    assert waited < PATIENCE  # closed by the server, not left for the client's timeout


def test_headers_beyond_the_cap_are_refused_without_being_read_whole(strict: ServerProcess) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: ")
        try:
            for _ in range(8 * 1024):  # 8 MB of one header, unless the server stops it first
                sock.sendall(b"a" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, _ = closed_after(sock)

    assert received.startswith(b"HTTP/1.1 431 ")


def test_headers_beyond_the_cap_in_one_read_are_refused_too(strict: ServerProcess) -> None:
    """The read that holds the request line counts: a first packet past the cap is refused."""
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST /auth/guest HTTP/1.1\r\nHost: 127.0.0.1\r\nX-CSRF: 1\r\nX-A: "
        + b"a" * 20_000
        + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    ):
        with connect(strict) as sock:
            sock.sendall(request)
            received, _ = closed_after(sock)

        assert received.startswith(b"HTTP/1.1 431 ")
        assert received.count(b"HTTP/1.1") == 1  # that answer only: the request never ran


def test_requests_that_take_longer_than_the_limits_to_answer_are_not_cut(
    strict: ServerProcess, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", stall=1.5)
    with guest_of(strict.url) as client:
        answer = client.post("/api/workflows/tutor/stream", json={"message": "slow"})
        again = client.get("/auth/session")  # the same keep-alive connection, past the header timeout

    assert answer.status_code == 200 and answer.text
    assert again.status_code == 200


def test_connections_beyond_the_limit_are_answered_503(emulator: ServerProcess) -> None:
    server = start_proxy(emulator.url, BFF_MAX_CONNECTIONS="16")
    try:
        with ExitStack() as held:
            for _ in range(16):
                held.enter_context(connect(server))
            refused = httpx.get(server.url + "/healthz")
        after = httpx.get(server.url + "/healthz")
    finally:
        server.stop()

    assert refused.status_code == 503
    assert after.status_code == 200
