"""The load generator: a lean HTTP/1.1 client on raw asyncio sockets, parsed by httptools.

It must cost far less per request and per chunk than any proxy it measures, so it has no client
library's pool or header machinery: a connection is an `asyncio.Protocol`, a request is bytes, and
each read is stamped with `time.monotonic()` (CLOCK_MONOTONIC, the clock the bench upstream reports
in) before the parser sees it. Every request is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import cast

import httptools


def chunk_bytes(topic: str, index: int, size: int) -> bytes:
    """Chunk `index` of a bench stream; the same bytes bench/upstream.mjs writes."""
    base = f"[{topic}:{index}]é".encode()
    return base if len(base) >= size else base + b"." * (size - len(base))


def expected_chunks(topic: str, count: int, size: int) -> list[bytes]:
    return [chunk_bytes(topic, index, size) for index in range(count)]


@dataclass
class Exchange:
    """One request and what came back, with the time of every read that carried body bytes."""

    started_at: float = 0.0  # before connecting, for requests that open their own connection
    sent_at: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, body bytes so far)
    first_byte_at: float | None = None
    done_at: float | None = None
    error: str | None = None
    keep_alive: bool = False
    started: asyncio.Event | None = None  # set at the first body byte, or when the exchange fails

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done_at is not None

    def ttfb(self, *, from_connect: bool = False) -> float | None:
        if self.first_byte_at is None:
            return None
        return self.first_byte_at - (self.started_at if from_connect else self.sent_at)

    def chunk_arrivals(self, chunks: list[bytes]) -> list[float]:
        """When each expected chunk was complete at the client (a read can carry several)."""
        times: list[float] = []
        reads = iter(self.arrivals)
        at, received = next(reads, (0.0, 0))
        boundary = 0
        for chunk in chunks:
            boundary += len(chunk)
            while received < boundary:
                step = next(reads, None)
                if step is None:
                    return times
                at, received = step
            times.append(at)
        return times


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.finished: asyncio.Future[None] | None = None
        self.closed = False
        self._now = 0.0
        self._header_name = ""

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad response: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # Every target frames its bodies (chunked or Content-Length), so a close before the end of
        # the message means the response was cut off.
        if self.exchange is not None and self.exchange.done_at is None:
            self._fail("connection closed" + (f": {exc}" if exc else ""))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.exchange is not None
        self.exchange.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.exchange is not None
        self.exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.first_byte_at is None:
            exchange.first_byte_at = self._now
            if exchange.started is not None:
                exchange.started.set()
        exchange.body += body
        total = len(exchange.body)
        if exchange.arrivals and exchange.arrivals[-1][0] == self._now:
            exchange.arrivals[-1] = (self._now, total)
        else:
            exchange.arrivals.append((self._now, total))

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.done_at = self._now
        exchange.keep_alive = self.parser.should_keep_alive()
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def _fail(self, reason: str) -> None:
        if self.exchange is not None and self.exchange.error is None:
            self.exchange.error = reason
        if self.exchange is not None and self.exchange.started is not None:
            self.exchange.started.set()
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def start(self, request: bytes, exchange: Exchange) -> Exchange:
        """Send one request; the response fills `exchange` in as it arrives."""
        if self.closed or self.transport is None:
            exchange.error = "connection closed"
            return exchange
        self.exchange = exchange
        self.parser = httptools.HttpResponseParser(self)
        self.finished = asyncio.get_running_loop().create_future()
        exchange.sent_at = time.monotonic()
        if not exchange.started_at:
            exchange.started_at = exchange.sent_at
        self.transport.write(request)
        return exchange

    async def send(self, request: bytes, request_timeout: float, exchange: Exchange | None = None) -> Exchange:
        """Send one request and wait for the whole response (or the timeout, or a close)."""
        exchange = self.start(request, exchange or Exchange())
        if self.finished is None or exchange.error is not None:
            return exchange
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), request_timeout)
        except TimeoutError:
            exchange.error = f"timeout after {request_timeout:g} s"
            self.close()
        if not exchange.keep_alive:
            self.close()
        return exchange

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def request(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body

    async def fetch(self, request: bytes, request_timeout: float = 30.0) -> Exchange:
        """One request on its own connection, timed from before the connect."""
        exchange = Exchange(started_at=time.monotonic())
        try:
            connection = await asyncio.wait_for(Connection.open(self.host, self.port), request_timeout)
        except (OSError, TimeoutError) as exc:
            exchange.error = f"connect failed: {type(exc).__name__}: {exc}"
            return exchange
        try:
            return await connection.send(request, request_timeout, exchange)
        finally:
            connection.close()

    async def json(self, method: str, path: str, headers: dict[str, str] | None = None) -> object:
        """A control request (not measured): the parsed JSON body of a 200 answer."""
        exchange = await self.fetch(self.request(method, path, headers=headers))
        if not exchange.ok:
            raise RuntimeError(f"{method} {path}: {exchange.status} {exchange.error} {bytes(exchange.body)!r}")
        return json.loads(exchange.body)


class ConnectionPool:
    """A fixed set of keep-alive connections used one request at a time (closed-loop load)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.idle: list[Connection] = []

    async def send(self, request: bytes, request_timeout: float) -> Exchange:
        connection = None
        while self.idle and connection is None:
            candidate = self.idle.pop()
            connection = None if candidate.closed else candidate
        if connection is None:
            try:
                connection = await asyncio.wait_for(
                    Connection.open(self.endpoint.host, self.endpoint.port), request_timeout
                )
            except (OSError, TimeoutError) as exc:
                return Exchange(error=f"connect failed: {type(exc).__name__}: {exc}")
        exchange = await connection.send(request, request_timeout)
        if not connection.closed:
            self.idle.append(connection)
        return exchange

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()
