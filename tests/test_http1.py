"""The upstream's HTTP/1.1 client (proxy/upstream/http1.py), through `HttpUpstream`, against bare upstreams
on loopback sockets in this process: the pool's limit and its accounting through errors and
cancellations, timeouts, how an answer ends and when its connection is kept, what is done with an
upstream that sends what it should not, backpressure, and TLS.

The harness (`BareUpstream`, answers) is tests/test_upstream_client.py's."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.errors import ApiError
from proxy.upstream import UpstreamCut
from proxy.upstream import client as client_module
from proxy.upstream.client import HttpUpstream
from proxy.upstream.http1 import HIGH_WATER_BYTES, Http1Pool, _Connection
from proxy.upstream.http1 import Answer as HttpAnswer
from tests.test_upstream_client import (
    API_KEY,
    MINTED,
    Answer,
    BareUpstream,
    by_path,
    chunked_answer,
    json_answer,
    read_all,
)

SOON = 10  # seconds within which what a test waits for happens, or it failed
NEVER_ANSWERS = Answer(b"", "hold")
CLOSE_DELIMITED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def upstream(
    answer: Callable[[str, str], Answer],
    *,
    host: str = "127.0.0.1",
    name: str | None = None,
    path: str = "",
    server_tls: ssl.SSLContext | None = None,
    client_tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[HttpUpstream, BareUpstream]]:
    """`HttpUpstream` in front of a bare upstream; with `server_tls`, over https (the client trusting
    what `client_tls` trusts). `name`: the host the base URL names, if not the address it listens on."""
    bare = BareUpstream(answer)
    server = await asyncio.start_server(bare.serve, host, 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    name = name or (f"[{host}]" if ":" in host else host)
    scheme = "https" if server_tls is not None else "http"
    client = HttpUpstream(f"{scheme}://{name}:{port}{path}", API_KEY, max_stream_seconds=30.0)
    if client_tls is not None:
        client._pool._ssl = client_tls
    try:
        yield client, bare
    finally:
        await client.aclose()
        server.close()


def pool_of(client: HttpUpstream) -> Http1Pool:
    return client._pool


def connection_of(body: object) -> _Connection:
    answer: HttpAnswer = body._response  # type: ignore[attr-defined]
    return answer._connection


async def until(check: Callable[[], bool], what: str) -> None:
    """Let the loop run until `check()` holds (no sleeps: the loop is what makes it happen)."""
    with anyio.fail_after(SOON):
        while not check():  # noqa: ASYNC110 (what it waits for is the pool's state: nothing to await)
            await asyncio.sleep(0.001)
    assert check(), what


def always(answer: Answer) -> Callable[[str, str], Answer]:
    return lambda method, target: answer


def under(prefix: str, stream: Answer) -> Callable[[str, str], Answer]:
    """`by_path` for an API under a base URL's path."""
    return lambda method, target: by_path(stream)(method, target.removeprefix(prefix))


async def open_and_read(client: HttpUpstream) -> bytes:
    body = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
    try:
        return await read_all(body)
    finally:
        await body.aclose()


def small_pool(monkeypatch: pytest.MonkeyPatch, limit: int, wait: float) -> None:
    monkeypatch.setattr(client_module, "POOL_CONNECTIONS", limit)
    monkeypatch.setattr(client_module, "POOL_WAIT_SECONDS", wait)


# The pool's limit, and its accounting


@pytest.mark.anyio
async def test_past_the_pool_limit_a_request_waits_for_a_connection_to_be_given_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_pool(monkeypatch, limit=1, wait=30.0)
    async with upstream(by_path(chunked_answer(b"Owls"))) as (client, bare):
        first = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        second = asyncio.create_task(client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"}))
        await until(lambda: len(pool_of(client)._waiters) == 1, "the second request waits")
        assert len(bare.seen) == 1

        assert await read_all(first) == b"Owls"
        await first.aclose()
        with anyio.fail_after(SOON):
            body = await second
        assert await read_all(body) == b"Owls"
        await body.aclose()

        assert [request.connection for request in bare.seen] == [1, 1]
        assert pool_of(client).in_use == 0


@pytest.mark.anyio
async def test_a_request_that_finds_no_free_connection_in_time_is_an_upstream_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_pool(monkeypatch, limit=2, wait=0.2)
    async with upstream(by_path(chunked_answer(b"Owls", then="hold"))) as (client, bare):
        held = [await client.open_stream("wf_tutor", f"pub_tok_{n}", {"message": "owls"}) for n in (1, 2)]
        with pytest.raises(ApiError) as waited:
            await client.open_stream("wf_tutor", "pub_tok_3", {"message": "owls"})
        assert (waited.value.status, waited.value.code) == (504, "upstream_timeout")
        assert len(bare.seen) == 2  # the third never went out
        assert pool_of(client).in_use == 2

        for body in held:
            await body.aclose()
        assert pool_of(client).in_use == 0
        bare.answer = by_path(chunked_answer(b"Owls"))
        assert await open_and_read(client) == b"Owls"


@pytest.mark.anyio
async def test_a_request_cancelled_while_waiting_for_the_pool_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    small_pool(monkeypatch, limit=1, wait=30.0)
    async with upstream(by_path(chunked_answer(b"Owls"))) as (client, _):
        first = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        waiting = asyncio.create_task(client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"}))
        await until(lambda: len(pool_of(client)._waiters) == 1, "the second request waits")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool_of(client).in_use == 1

        await read_all(first)
        await first.aclose()
        assert pool_of(client).in_use == 0
        with anyio.fail_after(SOON):
            assert await open_and_read(client) == b"Owls"


@pytest.mark.anyio
async def test_a_waiter_woken_then_cancelled_passes_the_free_connection_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # Woken (its connection given back) and cancelled before it ran: the next in line must get the
    # connection now, not when the pool wait runs out.
    small_pool(monkeypatch, limit=1, wait=30.0)
    async with upstream(by_path(chunked_answer(b"Owls"))) as (client, _):
        first = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        woken = asyncio.create_task(open_and_read(client))
        await until(lambda: len(pool_of(client)._waiters) == 1, "one waits")
        next_in_line = asyncio.create_task(open_and_read(client))
        await until(lambda: len(pool_of(client)._waiters) == 2, "two wait")

        await read_all(first)
        await first.aclose()  # wakes the first waiter...
        woken.cancel()  # ...which is cancelled before it runs
        with anyio.fail_after(SOON):
            assert await next_in_line == b"Owls"
        with pytest.raises(asyncio.CancelledError):
            await woken
        assert pool_of(client).in_use == 0


@pytest.mark.anyio
async def test_a_request_cancelled_while_waiting_for_the_answer_closes_its_connection() -> None:
    async with upstream(always(NEVER_ANSWERS)) as (client, bare):
        task = asyncio.create_task(client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"}))
        await until(lambda: len(bare.seen) == 1, "the request went out")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool_of(client).in_use == 0
        assert not pool_of(client)._idle

        bare.answer = always(chunked_answer(b"Owls"))
        assert await open_and_read(client) == b"Owls"
        assert [request.connection for request in bare.seen] == [1, 2]


@pytest.mark.anyio
async def test_a_request_cancelled_while_connecting_holds_nothing_and_a_slow_connect_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A TLS handshake with a server that never says hello: the connection is made, never finished.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(client_module, "CONNECT_SECONDS", 0.2)
    client = HttpUpstream(f"https://127.0.0.1:{port}", API_KEY, max_stream_seconds=30.0)
    try:
        task = asyncio.create_task(client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"}))
        await until(lambda: len(accepted) == 1, "the connection was accepted")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool_of(client).in_use == 0

        with pytest.raises(ApiError) as slow:
            await client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"})
        assert (slow.value.status, slow.value.code) == (504, "upstream_timeout")
        assert "connecting to 127.0.0.1" in str(slow.value.__cause__)
        assert pool_of(client).in_use == 0
    finally:
        await client.aclose()
        server.close()


@pytest.mark.anyio
async def test_an_answer_released_twice_does_not_give_back_a_connection_now_serving_another() -> None:
    async with upstream(by_path(chunked_answer(b"Owls"))) as (client, _):
        first = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        await read_all(first)
        await first.aclose()
        second = await client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"})
        assert connection_of(second) is connection_of(first)

        await first.aclose()  # again, by mistake
        assert pool_of(client).in_use == 1
        assert await read_all(second) == b"Owls"
        await second.aclose()
        assert pool_of(client).in_use == 0


# Timeouts and unreachable upstreams


@pytest.mark.anyio
async def test_an_upstream_that_never_answers_is_an_upstream_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MINT_BACKOFF_SECONDS", 0.0)
    async with upstream(always(NEVER_ANSWERS)) as (client, bare):
        client._mint_timeout = 0.2
        with pytest.raises(ApiError) as silent:
            await client.mint_token(60)
        assert (silent.value.status, silent.value.code) == (504, "upstream_timeout")
        assert "sent nothing for 0.2 s" in str(silent.value.__cause__)
        assert len(bare.seen) == client_module.MINT_ATTEMPTS
        assert pool_of(client).in_use == 0


@pytest.mark.anyio
async def test_a_refused_connection_is_a_bad_gateway() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    client = HttpUpstream(f"http://127.0.0.1:{port}", API_KEY, max_stream_seconds=30.0)
    try:
        with pytest.raises(ApiError) as refused:
            await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert (refused.value.status, refused.value.code) == (502, "upstream_error")
        assert pool_of(client).in_use == 0
    finally:
        await client.aclose()


# How an answer ends, and whether its connection is kept


@pytest.mark.anyio
async def test_an_answer_that_ends_where_its_connection_does_is_read_whole_and_its_connection_not_kept() -> None:
    async with upstream(always(Answer(CLOSE_DELIMITED + b"Owls hunt at night.", "cut"))) as (client, bare):
        assert await open_and_read(client) == b"Owls hunt at night."
        bare.answer = always(chunked_answer(b"Owls"))
        assert await open_and_read(client) == b"Owls"

    assert [request.connection for request in bare.seen] == [1, 2]


@pytest.mark.anyio
async def test_a_chunked_answer_cut_short_is_a_cut_whatever_the_case_of_its_transfer_encoding() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
    async with upstream(always(Answer(head + b"5\r\nOwls \r\n", "cut"))) as (client, _):
        body = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert await body.read_chunk() == b"Owls "
        with pytest.raises(UpstreamCut), anyio.fail_after(SOON):
            await body.read_chunk()
        await body.aclose()


@pytest.mark.anyio
async def test_an_answer_with_connection_close_is_not_reused_and_one_with_a_length_is() -> None:
    closing = MINTED.replace(b"abc", b"one")
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(closing)
    async with upstream(always(json_answer(MINTED))) as (client, bare):
        assert (await client.mint_token(60)).token == "pub_tok_abc"
        assert (await client.mint_token(60)).token == "pub_tok_abc"
        bare.answer = always(Answer(head + closing))  # the server would serve on: the client must not
        assert (await client.mint_token(60)).token == "pub_tok_one"
        bare.answer = always(json_answer(MINTED))
        await client.mint_token(60)

    assert [request.connection for request in bare.seen] == [1, 1, 1, 2]


@pytest.mark.anyio
async def test_a_connection_the_upstream_closed_while_idle_is_not_reused() -> None:
    async with upstream(always(Answer(json_answer(MINTED).data, "cut"))) as (client, bare):
        await client.mint_token(60)  # kept-alive as far as the client knows; then the server closes it
        await until(lambda: not pool_of(client)._idle, "the client saw the connection close")
        await client.mint_token(60)

    assert [request.connection for request in bare.seen] == [1, 2]


@pytest.mark.anyio
async def test_a_connection_the_upstream_speaks_on_while_idle_is_dropped() -> None:
    speak = asyncio.Event()

    async def talkative(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(json_answer(MINTED).data)
        await speak.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(talkative, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpUpstream(f"http://127.0.0.1:{port}", API_KEY, max_stream_seconds=30.0)
    try:
        await client.mint_token(60)
        [idle] = pool_of(client)._idle
        speak.set()
        await until(lambda: idle.closed, "the idle connection was dropped")
        assert not pool_of(client)._idle
    finally:
        await client.aclose()
        server.close()


@pytest.mark.anyio
async def test_a_second_answer_after_the_first_is_not_read_and_drops_the_connection() -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    async with upstream(always(Answer(chunked_answer(b"Owls").data + smuggled))) as (client, bare):
        assert await open_and_read(client) == b"Owls"
        bare.answer = always(chunked_answer(b"Owls"))
        assert await open_and_read(client) == b"Owls"  # a new connection, not the smuggled answer

    assert [request.connection for request in bare.seen] == [1, 2]


@pytest.mark.anyio
async def test_informational_answers_are_skipped_for_the_answer_that_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    # An Early Hints answer goes ahead of the answer: the client has read it before the answer comes.
    received = asyncio.Event()
    data_received = _Connection.data_received

    def noting(connection: _Connection, data: bytes) -> None:
        data_received(connection, data)
        received.set()

    monkeypatch.setattr(_Connection, "data_received", noting)

    async def hinting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </owls.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
            received.clear()
            await received.wait()
            writer.write(json_answer(MINTED).data)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hinting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpUpstream(f"http://127.0.0.1:{port}", API_KEY, max_stream_seconds=30.0)
    try:
        with anyio.fail_after(SOON):
            assert (await client.mint_token(60)).token == "pub_tok_abc"
            assert (await client.mint_token(60)).token == "pub_tok_abc"  # on the same connection
    finally:
        await client.aclose()
        server.close()


# Answers that are not HTTP


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: owl\r\n" * 257 + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["not-http", "two-lengths", "upgrade", "too-many-headers"],
)
@pytest.mark.anyio
async def test_an_answer_that_is_not_http_is_a_bad_gateway(data: bytes) -> None:
    async with upstream(always(Answer(data, "hold"))) as (client, _):
        with pytest.raises(ApiError) as malformed, anyio.fail_after(SOON):
            await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert (malformed.value.status, malformed.value.code) == (502, "upstream_error")
        assert pool_of(client).in_use == 0


@pytest.mark.anyio
async def test_a_head_that_never_ends_is_a_bad_gateway_not_memory_without_bound() -> None:
    endless = b"HTTP/1.1 200 OK\r\nX-Owl: " + b"h" * 1_000_000
    async with upstream(always(Answer(endless, "hold"))) as (client, _):
        with pytest.raises(ApiError) as malformed, anyio.fail_after(SOON):
            await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})  # no read timeout
        assert (malformed.value.status, malformed.value.code) == (502, "upstream_error")
        assert pool_of(client).in_use == 0


@pytest.mark.anyio
async def test_broken_chunk_framing_mid_stream_delivers_the_words_before_it_then_a_cut() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with upstream(always(Answer(head + b"5\r\nOwls \r\n4\r\nhunt\r\nZZ\r\nat night", "hold"))) as (client, _):
        body = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        received = b""
        with pytest.raises(UpstreamCut), anyio.fail_after(SOON):
            while True:
                received += await body.read_chunk()
        await body.aclose()
        assert received == b"Owls hunt"
        assert pool_of(client).in_use == 0


# Backpressure


@pytest.mark.anyio
async def test_a_large_answer_read_slowly_pauses_reading_and_resumes() -> None:
    piece = b"o" * 65536
    pieces = 64  # 4 MiB: far more than the client holds unread
    async with upstream(always(chunked_answer(*[piece] * pieces))) as (client, _):
        body = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        connection = connection_of(body)
        transport = connection.transport
        assert transport is not None
        await until(lambda: connection.paused, "reading paused")
        assert not transport.is_reading()
        held = connection.buffered
        assert HIGH_WATER_BYTES < held <= HIGH_WATER_BYTES + 2 * 256 * 1024  # at most a read or two past the mark

        first = await body.read_chunk()
        assert len(first) == held
        assert transport.is_reading()
        rest = await read_all(body)
        assert len(first) + len(rest) == len(piece) * pieces
        await body.aclose()
        assert pool_of(client)._idle == [connection]  # read to its end: kept


# What goes out


@pytest.mark.anyio
async def test_a_header_value_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with upstream(by_path(chunked_answer(b"Owls"))) as (client, bare):
        for smuggled in ("trace-1\r\nX-Admin: yes", "trace-1\nX-Admin: yes", "trace-1\0"):
            with pytest.raises(ValueError, match="line breaks"):
                await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"}, request_id=smuggled)
            with pytest.raises(ValueError, match="line breaks"):
                await client.mint_token(60, request_id=smuggled)
        assert pool_of(client).in_use == 0
        assert not pool_of(client)._idle  # not even a connection was made

    assert bare.seen == []


@pytest.mark.anyio
async def test_a_base_url_with_a_path_puts_the_api_under_it() -> None:
    async with upstream(under("/tutor", chunked_answer(b"Owls")), path="/tutor/") as (client, bare):
        await client.mint_token(60)
        await open_and_read(client)

    assert [request.target for request in bare.seen] == [
        "/tutor/api/v1/token?ttl=60",
        "/tutor/api/v1/run/wf_tutor/stream?token=pub_tok_1",
    ]


@pytest.mark.anyio
async def test_an_ipv6_base_url_sends_its_host_in_brackets() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        async with upstream(always(json_answer(MINTED)), host="::1") as (client, bare):
            await client.mint_token(60)
    except OSError as exc:  # a machine without an IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")

    port = client._server[1]
    assert bare.seen[0].headers["host"] == f"[::1]:{port}"


# TLS


@dataclass
class Certificates:
    ca: Path
    server: ssl.SSLContext  # serves a certificate for 127.0.0.1 and localhost
    other: ssl.SSLContext  # serves a certificate for another name
    client: ssl.SSLContext  # trusts the CA, checks host names (as the pool's default context does)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and two server certificates it signed."""
    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("workflow-bff test CA"))
        .issuer_name(_name("workflow-bff test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def serving(names: list[x509.GeneralName], stem: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        chain = folder / f"{stem}.pem"
        chain.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain)
        return context

    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    client = ssl.create_default_context(cafile=str(ca_path))
    return Certificates(
        ca=ca_path,
        server=serving(loopback, "loopback"),
        other=serving([x509.DNSName("upstream.example")], "other"),
        client=client,
    )


@pytest.mark.anyio
async def test_over_tls_requests_work_and_connections_are_kept(certificates: Certificates) -> None:
    served = under("/tutor", chunked_answer(b"Owls ", b"hunt"))
    tls = certificates.server, certificates.client
    async with upstream(served, name="localhost", path="/tutor", server_tls=tls[0], client_tls=tls[1]) as (
        client,
        bare,
    ):
        minted = await client.mint_token(60)
        body = await client.open_stream("wf_tutor", minted.token, {"message": "owls"})
        assert await read_all(body) == b"Owls hunt"
        await body.aclose()
        assert await open_and_read(client) == b"Owls hunt"

    assert [request.target.split("?")[0] for request in bare.seen] == [
        "/tutor/api/v1/token",
        "/tutor/api/v1/run/wf_tutor/stream",
        "/tutor/api/v1/run/wf_tutor/stream",
    ]
    assert [request.connection for request in bare.seen] == [1, 1, 1]


@pytest.mark.parametrize(
    ("server", "client", "name", "why"),
    [
        # Certificates the CA signed, for another name than the base URL's (a name, an address)
        ("other", "client", "localhost", "Hostname mismatch, certificate is not valid for 'localhost'"),
        ("other", "client", "127.0.0.1", "IP address mismatch, certificate is not valid for '127.0.0.1'"),
        ("server", None, "localhost", "certificate verify failed"),  # the default context knows no test CA
    ],
    ids=["another-name", "another-address", "unknown-ca"],
)
@pytest.mark.anyio
async def test_over_tls_a_certificate_that_is_not_the_upstreams_is_a_bad_gateway(
    certificates: Certificates, server: str, client: str | None, name: str, why: str
) -> None:
    server_tls: ssl.SSLContext = getattr(certificates, server)
    client_tls: ssl.SSLContext | None = getattr(certificates, client) if client else None
    served = always(json_answer(MINTED))
    async with upstream(served, name=name, server_tls=server_tls, client_tls=client_tls) as (
        upstream_client,
        bare,
    ):
        with pytest.raises(ApiError) as refused:
            await upstream_client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert (refused.value.status, refused.value.code) == (502, "upstream_error")
        assert why in str(refused.value.__cause__)
        assert pool_of(upstream_client).in_use == 0

    assert bare.seen == []


@pytest.mark.anyio
async def test_over_tls_an_answer_that_ends_where_its_connection_does_is_read_whole(
    certificates: Certificates,
) -> None:
    served = always(Answer(CLOSE_DELIMITED + b"Owls hunt at night.", "cut"))
    async with upstream(served, server_tls=certificates.server, client_tls=certificates.client) as (client, bare):
        assert await open_and_read(client) == b"Owls hunt at night."
        bare.answer = always(chunked_answer(b"Owls"))
        assert await open_and_read(client) == b"Owls"

    assert [request.connection for request in bare.seen] == [1, 2]
