"""Relay one upstream stream to one browser, chunk by chunk.

Starlette's StreamingResponse only notices a client that left once the response has started, and a
model can take minutes to its first token. So this response watches `receive()` for `http.disconnect`
from the very start, and cancels everything, including the pending upstream request, the moment the
browser goes away. The whole relay runs under one deadline (`BFF_MAX_STREAM_SECONDS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.errors import ApiError, send_error
from proxy.protocols import StreamEncoder

logger = logging.getLogger("proxy.relay")

OpenUpstream = Callable[[], Awaitable[httpx.Response]]
STREAM_HEADERS = {
    # No buffering anywhere between the upstream and the browser: nginx honours X-Accel-Buffering,
    # and no-transform keeps compressing proxies from holding chunks back.
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
INTERRUPTED = "The answer was interrupted. Please try again."
TOO_LONG = "The answer took too long and was stopped."


@dataclass
class RelayStats:
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    bytes_out: int = 0
    end: str = "unknown"


class RelayResponse(Response):
    def __init__(
        self, open_upstream: OpenUpstream, encoder: StreamEncoder, *, deadline: float, description: str
    ) -> None:
        super().__init__()
        self.open_upstream = open_upstream
        self.encoder = encoder
        self.deadline = deadline
        self.description = description
        self.stats = RelayStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if self.stats.end == "unknown":
                    self.stats.end = "client_gone_early" if self.stats.first_byte_at is None else "client_gone"
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            try:
                await self._relay(scope["path"], send)
            finally:
                group.cancel_scope.cancel()
                self._log()

    async def _relay(self, path: str, send: Send) -> None:
        upstream: httpx.Response | None = None
        started = False
        try:
            with anyio.move_on_after(self.deadline):
                try:
                    upstream = await self.open_upstream()
                except ApiError as error:
                    self.stats.end = f"refused:{error.code}"
                    await send_error(error, path, send)
                    return
                await send({"type": "http.response.start", "status": 200, "headers": self._start_headers()})
                started = True
                prefix = self.encoder.open()
                async for data in upstream.aiter_raw():
                    if self.stats.first_byte_at is None:
                        self.stats.first_byte_at = time.monotonic()
                    await self._send(send, prefix + self.encoder.chunk(data))
                    prefix = b""
                await self._send(send, prefix + self.encoder.close(), more=False)
                self.stats.end = "complete"
                return
            self.stats.end = "deadline"
            if not started:
                await send_error(ApiError(504, "upstream_timeout", TOO_LONG), path, send)
            else:
                await self._fail(send, TOO_LONG)
        except httpx.TransportError as exc:
            logger.warning("upstream stream broke off: %s", type(exc).__name__)
            self.stats.end = "upstream_cut"
            await self._fail(send, INTERRUPTED)
        finally:
            if upstream is not None:
                # Closing must finish even when we are being cancelled, or the connection leaks.
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> None:
        self.stats.bytes_out += len(body)
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def _fail(self, send: Send, message: str) -> None:
        ending = self.encoder.fail(message)
        if ending is not None:
            await self._send(send, ending, more=False)
        # Otherwise return without completing the body: the server drops the connection, and a client
        # sees a broken stream instead of a short answer that looks complete.

    def _start_headers(self) -> list[tuple[bytes, bytes]]:
        headers = {"Content-Type": self.encoder.media_type, **STREAM_HEADERS, **self.encoder.headers}
        return [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    def _log(self) -> None:
        now = time.monotonic()
        first = self.stats.first_byte_at
        logger.info(
            "relay end",
            extra={
                "relay": self.description,
                "end": self.stats.end,
                "bytes": self.stats.bytes_out,
                "ttfb_ms": round((first - self.stats.started_at) * 1000, 1) if first else None,
                "duration_ms": round((now - self.stats.started_at) * 1000, 1),
            },
        )
