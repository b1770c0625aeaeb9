"""A lean HTTP/1.1 client for the one upstream: a pool of keep-alive connections, each an asyncio
protocol whose answers httptools (the C parser uvicorn serves with) takes apart.

Why not aiohttp, which this replaced: per request it built a URL, two header multidicts, a request, a
response, a stream reader, a payload, a timer context and trace hooks, and it re-armed a read timer on
every chunk; it was a fifth of a relay's CPU. What a relay needs from a client is much less: one host,
requests whose headers and body are ours and known in full, answers read chunk by chunk as they come,
connections kept for the next request. Here a request is one write of bytes built in one go, and an
answer is the connection itself, read until it ends (`Answer`).

Errors are the standard ones, which errors.py maps: `TimeoutError` (connect, pool wait, or a read
timeout: 504) and `ConnectionError` (refused, reset, closed before the answer ended, or an answer that
is not HTTP: 502). Bytes that arrived before a connection broke are read first; the error comes after.

What an upstream sends is not trusted to be well formed: informational (1xx) answers are skipped, an
answer's head is bounded, and anything after an answer's end (a second answer nobody asked for) drops
the connection instead of being read as the next request's answer or as part of this one.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import cast

import httptools

# Stop reading from the socket while this much of an answer waits for its reader (backpressure).
HIGH_WATER_BYTES = 256 * 1024
# The parser holds a header line until it ends: past this many bytes that it made nothing of (a head,
# or a trailer, that never ends), the answer is malformed rather than memory to grow without bound.
STALLED_BYTES = 64 * 1024
# Repeated headers are joined, each join a copy: a bound on the lines keeps a flood of them linear.
MAX_HEADERS = 256


class ConnectionLost(ConnectionError):
    """The upstream closed the connection before its answer ended."""


class MalformedAnswer(ConnectionError):
    """What the upstream sent is not an HTTP/1.1 answer."""


class _Connection(asyncio.Protocol):
    """One connection: the answer it is receiving (status, headers, body chunks not yet read), and
    whether it can take another request when that answer has been read to its end."""

    __slots__ = (
        "buffered",
        "chunks",
        "closed",
        "complete",
        "error",
        "header_lines",
        "headers",
        "headers_done",
        "idle_since",
        "in_use",
        "keep_alive",
        "parser",
        "paused",
        "pool",
        "stalled",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.in_use = True  # made for a request, whose it is from the start
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.header_lines = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.stalled = 0
        self.error: BaseException | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, only alike

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # an idle connection has nothing to be told: it is not one to reuse
            self.close()
            return
        buffered, headers_done = self.buffered, self.headers_done
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # Upgrade (101) is not one
            # A check of ours in a callback comes wrapped: its words say more than the wrapper's.
            cause = exc.__context__
            self._malformed(
                cause if isinstance(cause, MalformedAnswer) else MalformedAnswer(f"malformed answer: {exc!r}")
            )
            return
        if self.buffered == buffered and self.headers_done == headers_done and not self.complete:
            self.stalled += len(data)
            if self.stalled > STALLED_BYTES:
                self._malformed(MalformedAnswer(f"no answer's head, nor body, in {self.stalled} bytes"))
        else:
            self.stalled = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if exc is None and self.headers_done and self._ends_at_close():
                self.complete = True  # an answer without a length ends where the connection does
            else:
                self._fail(exc or ConnectionLost("the upstream closed the connection before the answer ended"))
        self.pool.forget(self)
        self._wake()
        # The parser holds this protocol to call it back: a cycle, freed by the cycle collector alone
        # (with a TLS connection's buffers), which `serve` runs rarely. Nothing is parsed from here on.
        del self.parser

    def pause_writing(self) -> None:  # a request is one small write: nothing waits on the buffer
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # we send one request at a time: a second answer is one nobody asked for
            raise MalformedAnswer("the upstream sent more after the end of its answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:  # a trailer: nothing here reads one
            return
        self.header_lines += 1
        if self.header_lines > MAX_HEADERS:
            raise MalformedAnswer(f"more than {MAX_HEADERS} header lines")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: informational, the answer comes after it
            self.headers = {}
            return
        self.status = status
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an informational answer
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # only known until the parser moves on
        self._wake()

    # for the pool and the answer

    def _ends_at_close(self) -> bool:
        # Header values are case-insensitive: a "Chunked" answer cut short must not pass for whole.
        return (
            "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "").lower()
        )

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _malformed(self, error: MalformedAnswer) -> None:
        self._fail(error)
        self.close()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, read_timeout: float | None) -> None:
        """Until the parser has something new for the reader, or the connection ends."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ConnectionLost("the upstream closed the connection before the answer ended")
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        if read_timeout is None:
            await waiter
            return
        try:
            async with asyncio.timeout(read_timeout):
                await waiter
        except TimeoutError:
            raise TimeoutError(f"the upstream sent nothing for {read_timeout:g} s") from None

    def send(self, request: bytes) -> None:
        self._reset()
        assert self.transport is not None
        self.transport.write(request)

    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.complete
            and not self.closed
            and self.error is None
            and transport is not None
            and not transport.is_closing()
            and self.keep_alive
        )

    def close(self) -> None:
        # Closed from now on, not from when the loop calls connection_lost: no request may take it.
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Answer:
    """An upstream's answer: status and headers (names in lower case), then its body, read as it comes.
    Read it to its end and `release()` it, or `close()` it: the connection is the answer's until then."""

    __slots__ = ("_connection", "_done", "_pool", "_read_timeout", "headers", "status")

    def __init__(self, pool: Http1Pool, connection: _Connection, read_timeout: float | None) -> None:
        self._pool = pool
        self._connection = connection
        self._read_timeout = read_timeout
        self._done = False
        self.status = connection.status
        self.headers = connection.headers

    async def read_chunk(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some if none have), b"" at the end. A read
        timeout is the longest silence allowed between two pieces."""
        connection = self._connection
        while not connection.chunks:
            if connection.complete:
                return b""
            await connection.wait(self._read_timeout)
        chunks = connection.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        connection.buffered = 0
        if connection.paused and connection.transport is not None:
            connection.paused = False
            connection.transport.resume_reading()
        return data

    def at_eof(self) -> bool:
        return self._connection.complete and not self._connection.chunks

    def release(self) -> None:
        """Done with it: the connection goes back to the pool if the answer was read to its end."""
        # Once only: by a second call, the connection may be serving another request.
        if not self._done:
            self._done = True
            self._pool.give_back(self._connection)

    def close(self) -> None:
        """Done with it midway: the connection goes, or the next request would read the rest."""
        if not self._done:
            self._done = True
            self._connection.close()
            self._pool.give_back(self._connection)


class Http1Pool:
    """Keep-alive connections to one host and port (with TLS for https), at most `limit` in use."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        limit: int,
        keepalive_seconds: float,
        connect_seconds: float,
        pool_wait_seconds: float,
    ) -> None:
        self.host, self.port = host, port
        self._ssl = ssl.create_default_context() if tls else None
        self._limit = limit
        self._keepalive = keepalive_seconds
        self._connect_seconds = connect_seconds
        self._pool_wait_seconds = pool_wait_seconds
        self._idle: list[_Connection] = []
        self._in_use = 0  # connections lent out or being made
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def request(self, request: bytes, read_timeout: float | None) -> Answer:
        """Send `request` (a whole HTTP/1.1 request: head and body) and wait for its answer's headers."""
        connection = await self._connection()
        try:
            connection.send(request)
            while not connection.headers_done:
                await connection.wait(read_timeout)
        except BaseException:
            connection.close()
            self.give_back(connection)
            raise
        return Answer(self, connection, read_timeout)

    @property
    def in_use(self) -> int:
        """Connections lent out or being made."""
        return self._in_use

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # once it waits: the pool wait bounds waiting and connecting
        while True:
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                transport = connection.transport
                usable = transport is not None and not transport.is_closing()  # closed, or being closed
                if usable and not connection.closed and now - connection.idle_since < self._keepalive:
                    self._lend(connection)
                    return connection
                connection.close()
            if self._in_use < self._limit:
                break
            if deadline is None:
                deadline = loop.time() + self._pool_wait_seconds
            await self._wait_for_room(loop, deadline)
        connect_seconds = (
            self._connect_seconds if deadline is None else min(self._connect_seconds, deadline - loop.time())
        )
        self._in_use += 1  # holds the place while connecting
        try:
            async with asyncio.timeout(connect_seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except BaseException as exc:
            self._in_use -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"connecting to {self.host}:{self.port} timed out") from None
            raise
        return connection

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Until a connection is given back (then the caller looks again: another may have been quicker)."""
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but cancelled or out of time first: the room is the next one's
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no free connection within {self._pool_wait_seconds:g} s") from None
            raise

    def _lend(self, connection: _Connection) -> None:
        connection.in_use = True
        self._in_use += 1

    def give_back(self, connection: _Connection) -> None:
        if not connection.in_use:
            return
        connection.in_use = False
        self._in_use -= 1
        if connection.reusable():
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        """A connection closed (by either side): an idle one leaves the pool; a lent one's reader
        finds out, and gives it back."""
        if not connection.in_use and connection in self._idle:
            self._idle.remove(connection)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close the idle connections; those lent out close with their answers."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()
