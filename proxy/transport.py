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
from collections.abc import AsyncIterator
from typing import Protocol

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

# The response extension holding the open body (see `open_body`).
BODY = "bff.body"


class Body(Protocol):
    """An open response body, read chunk by chunk."""

    async def read_chunk(self) -> bytes:
        """The bytes that have arrived since the last call, as soon as there are any; b"" at the end."""
        ...

    async def aclose(self) -> None: ...


def open_body(response: httpx.Response) -> Body:
    """The body of a streamed `response`, to read chunk by chunk; the caller closes it.

    For a response from `AiohttpTransport` this is the aiohttp stream itself: a chunk costs one await,
    where httpx's `aiter_raw()` resumes three nested async generators, and the caller need not keep the
    httpx response, with its request and both sets of headers, for the minutes a stream runs.
    """
    body: Body | None = response.extensions.get(BODY)
    return body if body is not None else _HttpxBody(response)


class _HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw()
        self.aclose = response.aclose

    async def read_chunk(self) -> bytes:
        return await anext(self._chunks, b"")


class AiohttpResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._failure: httpx.TransportError | None = None

    async def read_chunk(self) -> bytes:
        # Whatever bytes have arrived, as they arrive: never waits to fill a buffer.
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
            extensions={"http_version": b"HTTP/1.1", BODY: stream},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
