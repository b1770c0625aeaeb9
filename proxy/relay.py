"""Relay one upstream stream to one browser, chunk by chunk.

Starlette's StreamingResponse only notices a client that left once the response has started, and a
model can take minutes to its first token. So this response watches `receive()` for `http.disconnect`
from the very start, and cancels everything, including the pending upstream request, the moment the
browser goes away. The whole relay runs under one deadline (`BFF_MAX_STREAM_SECONDS`).

Until the upstream's first byte, protocols that can say nothing (SSE comments, blank lines) send
keep-alives, so proxies with an idle timeout do not cut a long wait. The 200 is committed when the
upstream answers, or at the first keep-alive if it has not yet; errors after that go in-band.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.errors import ApiError, send_error, shutting_down, unauthenticated
from proxy.limits import Lease
from proxy.metrics import Metrics
from proxy.middleware.access_log import annotate
from proxy.protocols import StreamEncoder
from proxy.streams import StreamOwner
from proxy.transport import Body, open_body

logger = logging.getLogger("proxy.relay")

T = TypeVar("T")
OpenUpstream = Callable[[], Awaitable[httpx.Response]]
STREAM_HEADERS = {
    # No buffering anywhere between the upstream and the browser: nginx honours X-Accel-Buffering,
    # and no-transform keeps compressing proxies from holding chunks back.
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
INTERRUPTED = "The answer was interrupted. Please try again."
TOO_LONG = "The answer took too long and was stopped."
FAILED = "An error occurred."
SESSION_ENDED = "The session ended."
RESTARTING = "The service is restarting. Please try again."
# Below the usual proxy idle timeouts (nginx and AWS ALB: 60 s).
KEEPALIVE_SECONDS = 15.0


class DisconnectWatch:
    """While entered, a task of its own waits for the client's `http.disconnect`, then calls
    `on_disconnect`, which stops whatever the client was waiting for.

    The request body must have been read, so that `receive()` has nothing left to say but
    `http.disconnect`. A plain asyncio task, not a task group: one lives as long as each open stream,
    and an anyio task group holding it costs about 5 KB more per stream.
    """

    __slots__ = ("_on_disconnect", "_receive", "_task")

    def __init__(self, receive: Receive, on_disconnect: Callable[[], None]) -> None:
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._on_disconnect()


@dataclass
class RelayStats:
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    bytes_out: int = 0
    chars: int = 0  # characters of generated text relayed: what output budgets are charged
    end: str = "unknown"


OnEnd = Callable[[RelayStats], Awaitable[None]]


class RelayResponse(Response):
    def __init__(
        self,
        open_upstream: OpenUpstream,
        encoder: StreamEncoder,
        *,
        deadline: float,
        description: str,
        owner: StreamOwner | None = None,
        headers: Mapping[str, str] | None = None,
        lease: Lease | None = None,
        metrics: Metrics | None = None,
        on_end: OnEnd | None = None,
    ) -> None:
        super().__init__()
        self.extra_headers = dict(headers or {})
        # The user's stream slot, renewed while this relay runs and released when it ends.
        self.lease = lease
        self.metrics = metrics
        self.on_end = on_end
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.open_upstream = open_upstream
        self.encoder = encoder
        self.deadline = deadline
        self.description = description
        self.stats = RelayStats()
        # A quarter of the deadline when that is shorter, so even a short deadline sees keep-alives.
        self.keepalive_seconds = min(KEEPALIVE_SECONDS, deadline / 4)
        self.started = False
        self.upstream_body: Body | None = None  # the upstream's, once it answered
        # Whose relay this is: registered while it runs, so logout can stop it (proxy/streams.py).
        self.owner = owner
        self.stop_reason: str | None = None
        self._window: anyio.CancelScope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.metrics is not None:
            self.metrics.open_streams.inc()
        owner, lease = self.owner, self.lease
        try:
            with (
                owner.running(self.stop, lambda: self.stats.end) if owner is not None else contextlib.nullcontext(),
                DisconnectWatch(receive, lambda: self.stop("client_gone")),
                lease.kept() if lease is not None else contextlib.nullcontext(),
            ):
                await self._relay(scope["path"], send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()

    def stop(self, reason: str) -> None:
        """End this relay early: "client_gone" (the browser left) sends nothing more, "revoked" (its
        session ended) answers 401, "shutdown" (the drain deadline passed) 503, or either of these as
        an in-band error once the stream has started. The first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._window is not None:
            self._window.cancel()

    async def _finish(self) -> None:
        """Release the slot, then charge and count what was relayed; runs however the relay ended."""
        if self.lease is not None:
            await self.lease.release()
        if self.metrics is not None:
            self._observe(self.metrics)
        self._annotate()
        if self.on_end is not None:
            try:
                await self.on_end(self.stats)
            except Exception:
                logger.exception("relay end hook failed")

    async def _relay(self, path: str, send: Send) -> None:
        try:
            with anyio.move_on_after(self.deadline) as self._window:
                if self.stop_reason is not None:
                    self._window.cancel()
                try:
                    body = await self._keeping_alive(send, self._open)
                except ApiError as error:
                    self.stats.end = f"refused:{error.code}"
                    if self.started:
                        await self._fail(send, error.message)
                    else:
                        await send_error(error, path, send)
                    return
                await self._start(send)
                data = await self._keeping_alive(send, body.read_chunk)
                prefix = self.encoder.open()
                while data:
                    if self.stats.first_byte_at is None:
                        self.stats.first_byte_at = time.monotonic()
                    self.stats.chars += len(self._decoder.decode(data))
                    framed = prefix + self.encoder.chunk(data)
                    if framed:  # empty while a split UTF-8 character waits for its other bytes
                        await self._send(send, framed)
                        prefix = b""
                    data = await body.read_chunk()
                await self._send(send, prefix + self.encoder.close(), more=False)
                self.stats.end = "complete"
                return
            if self.stop_reason == "client_gone":
                self.stats.end = "client_gone_early" if self.stats.first_byte_at is None else "client_gone"
                return
            if self.stop_reason is not None:
                self.stats.end = self.stop_reason
                if self.started:
                    await self._fail(send, SESSION_ENDED if self.stop_reason == "revoked" else RESTARTING)
                elif self.stop_reason == "revoked":
                    await send_error(unauthenticated(), path, send)
                else:
                    await send_error(shutting_down(), path, send)
                return
            self.stats.end = "deadline"
            if not self.started:
                await send_error(ApiError(504, "upstream_timeout", TOO_LONG), path, send)
            else:
                await self._fail(send, TOO_LONG)
        except httpx.TransportError as exc:
            logger.warning("upstream stream broke off: %s", type(exc).__name__)
            self.stats.end = "upstream_cut"
            if self.metrics is not None:
                self.metrics.upstream_errors.labels("cut").inc()
            if self.started:
                await self._fail(send, INTERRUPTED)
            else:  # e.g. the connection broke while an upstream error body was being read
                await send_error(ApiError(502, "upstream_error", FAILED), path, send)
        except Exception:
            # Nothing may escape a started stream: the client would only see an opaque network error.
            logger.exception("relay failed")
            self.stats.end = "failed"
            if self.started:
                await self._fail(send, FAILED)
            else:
                await send_error(ApiError(502, "upstream_error", FAILED), path, send)
        finally:
            if self.upstream_body is not None:
                # Closing must finish even when we are being cancelled, or the connection leaks.
                with anyio.CancelScope(shield=True):
                    await self.upstream_body.aclose()

    async def _open(self) -> Body:
        # Kept on self at once, so the finally above closes it even if we are cancelled right after.
        self.upstream_body = open_body(await self.open_upstream())
        return self.upstream_body

    async def _keeping_alive(self, send: Send, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work`, sending the encoder's keep-alive each interval until it is done.

        `work` runs in a task of its own and is never interrupted by a keep-alive: cancelling a
        pending upstream request or read would lose it. The first keep-alive commits the 200.
        """
        keepalive = self.encoder.keepalive
        if keepalive is None:
            return await work()
        done = anyio.Event()
        outcome: list[T] = []
        failure: list[Exception] = []

        async def run() -> None:
            try:
                outcome.append(await work())
            except Exception as exc:  # re-raised below, in the caller's task
                failure.append(exc)
            finally:
                done.set()

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            while not done.is_set():
                with anyio.move_on_after(self.keepalive_seconds):
                    await done.wait()
                if not done.is_set():
                    await self._start(send)
                    await self._send(send, keepalive)
        if failure:
            raise failure[0]
        return outcome[0]

    async def _start(self, send: Send) -> None:
        if not self.started:
            self.started = True
            await send({"type": "http.response.start", "status": 200, "headers": self._start_headers()})

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
        headers = {
            "Content-Type": self.encoder.media_type,
            **STREAM_HEADERS,
            **self.encoder.headers,
            **self.extra_headers,
        }
        return [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    def _observe(self, metrics: Metrics) -> None:
        stats = self.stats
        metrics.open_streams.dec()
        metrics.stream_ends.labels(stats.end).inc()
        metrics.bytes_relayed.inc(stats.bytes_out)
        metrics.chars_relayed.inc(stats.chars)
        metrics.duration.observe(time.monotonic() - stats.started_at)
        if stats.first_byte_at is not None:
            metrics.first_byte.observe(stats.first_byte_at - stats.started_at)
        if stats.end.startswith("client_gone"):
            metrics.disconnects.labels("before_first_byte" if stats.first_byte_at is None else "after_first_byte").inc()

    def _annotate(self) -> None:
        """The relay's part of the request's summary line (proxy/middleware/access_log.py)."""
        annotate(
            relay=self.description,
            end=self.stats.end,
            chars=self.stats.chars,
            first_byte_at=self.stats.first_byte_at,
        )
