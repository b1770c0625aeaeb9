"""`HttpUpstream` (proxy/upstream/client.py) against a bare HTTP/1.1 upstream on a loopback port, in this
process: what goes out on the wire, what comes back, and what becomes of the connection.

Status mapping, retries and the circuit breaker are specified end to end in tests/test_upstream_errors.py
and tests/test_resilience.py."""

from __future__ import annotations

import asyncio
import itertools
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest
from pydantic import SecretStr

from proxy.errors import ApiError
from proxy.upstream import UpstreamBody, UpstreamCut
from proxy.upstream.client import HttpUpstream

API_KEY = SecretStr("sk_test_" + "k3y" * 12)
MINTED = b'{"success":true,"token":"pub_tok_abc","ttl":60}'
# Every answer tries to plant a cookie: one client serves every user, so it must never go out again.
COOKIE = b"Set-Cookie: upstream_sid=planted; Path=/\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    connection: int


@dataclass
class Answer:
    data: bytes
    then: str = "serve"  # "serve" the next request, "cut" the connection, or "hold" it until the client goes


def json_answer(body: bytes) -> Answer:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + COOKIE
    return Answer(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def chunked_answer(*chunks: bytes, then: str = "serve") -> Answer:
    """A streamed answer; one that is cut or held never sends the chunk that ends it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n" + COOKIE + b"\r\n"
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return Answer(head + framed + (b"0\r\n\r\n" if then == "serve" else b""), then)


class BareUpstream:
    """Answers each request with `answer(method, target)` and records what it was sent."""

    def __init__(self, answer: Callable[[str, str], Answer]) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        self._connections = itertools.count(1)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = next(self._connections)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = dict(line.split(":", 1) for line in head[1:] if line)
                headers = {name.lower(): value.strip() for name, value in headers.items()}
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Seen(method, target, headers, connection))
                answer = self.answer(method, target)
                writer.write(answer.data)
                await writer.drain()
                if answer.then == "hold":
                    await reader.read()  # until the client lets the connection go
                if answer.then != "serve":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@asynccontextmanager
async def upstream_answering(answer: Callable[[str, str], Answer]) -> AsyncIterator[tuple[HttpUpstream, BareUpstream]]:
    bare = BareUpstream(answer)
    server = await asyncio.start_server(bare.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpUpstream(f"http://127.0.0.1:{port}", API_KEY, max_stream_seconds=30.0)
    try:
        yield client, bare
    finally:
        await client.aclose()
        server.close()


async def read_all(body: UpstreamBody) -> bytes:
    received = b""
    with anyio.fail_after(10):
        while chunk := await body.read_chunk():
            received += chunk
    return received


def by_path(stream: Answer) -> Callable[[str, str], Answer]:
    return lambda method, target: json_answer(MINTED) if target.startswith("/api/v1/token") else stream


@pytest.mark.anyio
async def test_a_cookie_the_upstream_sets_is_never_sent_again() -> None:
    async with upstream_answering(by_path(chunked_answer(b"Owls"))) as (client, bare):
        first = await client.mint_token(60)
        await client.mint_token(60)
        body = await client.open_stream("wf_tutor", first.token, {"message": "owls"})
        await read_all(body)
        await body.aclose()

    assert len(bare.seen) == 3
    assert all("cookie" not in request.headers for request in bare.seen)


@pytest.mark.anyio
async def test_every_request_asks_for_an_unencoded_answer_and_carries_the_request_id() -> None:
    async with upstream_answering(by_path(chunked_answer(b"Owls"))) as (client, bare):
        minted = await client.mint_token(60, request_id="trace-1")
        body = await client.open_stream("wf_tutor", minted.token, {"message": "owls"}, request_id="trace-1")
        await body.aclose()

    mint, stream = bare.seen
    for request in (mint, stream):
        assert request.headers["accept-encoding"] == "identity"
        assert request.headers["x-request-id"] == "trace-1"
    assert mint.headers["authorization"] == f"Bearer {API_KEY.get_secret_value()}"
    assert "authorization" not in stream.headers  # the stream goes with its single-use token only
    assert stream.target == "/api/v1/run/wf_tutor/stream?token=pub_tok_abc"


@pytest.mark.anyio
async def test_an_answer_read_to_the_end_leaves_its_connection_for_the_next_request() -> None:
    async with upstream_answering(by_path(chunked_answer(b"Owls ", b"hunt at ", b"night."))) as (client, bare):
        first = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert await read_all(first) == b"Owls hunt at night."
        await first.aclose()
        second = await client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"})
        await read_all(second)
        await second.aclose()

    assert [request.connection for request in bare.seen] == [1, 1]


@pytest.mark.anyio
async def test_an_answer_abandoned_midway_takes_its_connection_with_it() -> None:
    async with upstream_answering(by_path(chunked_answer(b"Owls ", then="hold"))) as (client, bare):
        abandoned = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        assert await abandoned.read_chunk() == b"Owls "
        await abandoned.aclose()  # the client left, or the deadline passed
        bare.answer = by_path(chunked_answer(b"Owls"))
        next_one = await client.open_stream("wf_tutor", "pub_tok_2", {"message": "owls"})
        await read_all(next_one)  # never the rest of the abandoned answer
        await next_one.aclose()

    assert [request.connection for request in bare.seen] == [1, 2]


@pytest.mark.anyio
async def test_the_words_before_a_cut_reach_the_reader_then_the_cut_is_raised() -> None:
    async with upstream_answering(by_path(chunked_answer(b"Owls ", b"hunt", then="cut"))) as (client, _):
        body = await client.open_stream("wf_tutor", "pub_tok_1", {"message": "owls"})
        received = b""
        with pytest.raises(UpstreamCut), anyio.fail_after(10):
            while True:
                received += await body.read_chunk()
        await body.aclose()

    assert received == b"Owls hunt"


@pytest.mark.anyio
async def test_a_failure_before_the_stream_opened_never_carries_its_unspent_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client's error may name the URL (aiohttp's connect timeout did), and a stream URL carries a
    # token that was never spent: neither the error nor anything chained to it may hold it.
    async def times_out(request: bytes, read_timeout: float | None) -> None:
        target = request.split(b" ")[1].decode()
        raise TimeoutError(f"Connection timeout to host http://upstream{target}")

    token = "pub_tok_" + "unspent"  # not in this file's source, which a traceback quotes
    async with upstream_answering(lambda method, target: json_answer(MINTED)) as (client, _):
        monkeypatch.setattr(client._pool, "request", times_out)
        with pytest.raises(ApiError) as refused:
            await client.open_stream("wf_tutor", token, {"message": "hi"})

    told = "".join(traceback.format_exception(refused.value))
    assert refused.value.code == "upstream_timeout"
    assert "Connection timeout to host" in told  # the client's words stay, for `python -m proxy check`
    assert token not in told
