"""uvicorn's HTTP protocol with the limits a server facing the network needs, and uvicorn lacks.

uvicorn (httptools) closes an idle keep-alive connection, but not one that never finishes its
request: a connection that sends nothing, half its headers or half its body stays open for ever,
and the headers have no size cap (an 8 MB header is read whole). Each such socket also holds a file
descriptor. This protocol adds, per connection:
- the request's headers must arrive within `header_timeout` seconds of the connection (or of the
  previous response), else the connection is closed, and be at most `max_header_bytes`, else 431
  and the connection is closed;
- its body within `body_timeout` seconds of the headers, else the connection is closed.
The number of connections is capped by uvicorn's own `limit_concurrency` (503 beyond it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 25\r\nconnection: close\r\n\r\nRequest headers too large"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = 10.0
    body_timeout = 30.0
    max_header_bytes = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One timer per connection, re-armed only when it fires early: a request moves the deadline
        # (two float writes), not a timer (a call_later and a cancel, twice per request).
        self._guard: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._in_headers = True
        self._head_bytes = 0  # bytes received while the headers are incomplete
        self._header_bytes = 0  # the request line and the headers, as parsed
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Headers that never end are refused by what has arrived of them; headers that did end within
        # one read, by their parsed size (on_headers_complete): a body read along with them is no header.
        if self._in_headers:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._head_bytes > self.max_header_bytes:
            self._refuse()

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        # The count is not reset here: this runs inside the parse of the data that was just
        # counted, and a reset would let the first read of every request through uncounted.
        super().on_message_begin()
        self._in_headers = True
        if self._deadline is None:  # a keep-alive connection's next request: its headers are due now
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_bytes > self.max_header_bytes:
            self._refuse()  # and the request is never started
            return
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:  # a refused request was never started: its body has nowhere to go
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_headers, self._head_bytes, self._header_bytes = True, 0, 0

    def _refuse(self) -> None:
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(HEADERS_TOO_LARGE)
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        deadline = self._deadline = self.loop.time() + seconds
        if self._guard is not None and self._guard.when() > deadline:  # due sooner than the timer
            self._guard.cancel()
            self._guard = None
        if self._guard is None:
            self._guard = self.loop.call_at(deadline, self._check)

    def _disarm(self) -> None:
        self._deadline = None

    def _check(self) -> None:
        self._guard = None
        if self._deadline is None:
            return
        if self.loop.time() < self._deadline:  # the deadline moved on since the timer was set
            self._guard = self.loop.call_at(self._deadline, self._check)
        elif not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_header_bytes": max_header_bytes},
    )
