"""httpx's client API over aiohttp's connection pool.

httpx stays the API the rest of the code uses (requests, responses, timeouts, exceptions); only the
transport underneath changes. httpcore's pool does bookkeeping under locks on every request and chunk
(encode/httpx#3215), which measured as most of the relay's CPU; aiohttp's pool and parser do the same
work for a fraction of it (docs/PERFORMANCE.md). The mapping of aiohttp's exceptions to httpx's is
ours, because which class a failure gets decides the status the browser sees (a refused connection is
a 502, a timeout a 504).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx


def _mapped(exc: BaseException, *, reading: bool) -> httpx.TransportError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message) if reading else httpx.ConnectTimeout(message)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message)
    return httpx.ReadError(message) if reading else httpx.ConnectError(message)


TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
# The response extension holding the body's chunk reader (see `chunk_reader`).
READ_CHUNK = "bff.read_chunk"
ReadChunk = Callable[[], Awaitable[bytes]]


def chunk_reader(response: httpx.Response) -> ReadChunk:
    """Each call returns the next raw chunk of `response`'s body as it arrives, b"" at the end.

    A response from `AiohttpTransport` reads straight from aiohttp: one await per chunk, where httpx's
    `aiter_raw()` resumes three nested async generators. Any other response goes through `aiter_raw()`.
    """
    read: ReadChunk | None = response.extensions.get(READ_CHUNK)
    if read is not None:
        return read
    chunks = response.aiter_raw()
    return lambda: anext(chunks, b"")


class AiohttpResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._failure: httpx.TransportError | None = None

    async def read_chunk(self) -> bytes:
        """Whatever bytes have arrived, as they arrive (never waits to fill a buffer); b"" at the end."""
        if self._failure is not None:
            raise self._failure
        content = self._response.content
        try:
            return await content.readany()
        except TRANSPORT_ERRORS as exc:
            failure = _mapped(exc, reading=True)
            failure.__cause__ = exc
            # aiohttp raises a connection's error before handing over the bytes that arrived just
            # ahead of it; they are the answer's last words and belong to the client.
            leftover = content._read_nowait(-1)
            if not leftover:
                raise failure from exc
            self._failure = failure
            return leftover

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def aclose(self) -> None:
        # A body read to the end leaves a reusable connection; one abandoned midway (client gone,
        # deadline) must be closed, or the next request would read the rest of this one.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int, keepalive_expiry: float) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop, as aiohttp requires.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=self._keepalive_expiry),
                # One session serves every user: it must never keep or send cookies.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        try:
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.get("pool"),
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        except TRANSPORT_ERRORS as exc:
            raise _mapped(exc, reading=False) from exc
        stream = AiohttpResponseStream(response)
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=stream,
            request=request,
            extensions={"http_version": b"HTTP/1.1", READ_CHUNK: stream.read_chunk},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
