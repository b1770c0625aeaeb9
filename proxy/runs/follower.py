"""A follower: one response that reads a run's log and writes it, through a protocol encoder, to its
socket. The POST that started a run is its first follower; a resume is another.

A follower that is behind reads everything the log holds in one go and writes it in one send, so
under load the cost per chunk falls instead of rising. No write waits much longer than
`BFF_SEND_TIMEOUT_SECONDS` (a second at most): a client that does not read that long is dropped,
and the run goes on without it (a follower never holds the run, its slot or its upstream connection).

Starlette's StreamingResponse only notices a client that left once the response has started, and a
model can take minutes to its first token. So a follower watches `receive()` for `http.disconnect`
from the start, and leaving is what detaches it (`Run.detach`, which may end the run).

Until the run's first text, protocols that can say nothing (SSE comments, blank lines) send
keep-alives, so proxies with an idle timeout do not cut a long wait. The 200 is committed when the
upstream answers, or at the first keep-alive if it has not yet; errors after that go in-band.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
from collections.abc import Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from proxy.context import request_context
from proxy.errors import ApiError, error_response, errors_as_text
from proxy.protocols import StreamEncoder
from proxy.runs.ending import Ending
from proxy.runs.manager import RunManager
from proxy.storage import StorageUnavailable
from proxy.storage.runlog import END, TEXT, Entry, RunMeta, lost_entry, utf8_chars

STREAM_HEADERS = {
    # No buffering anywhere between the upstream and the browser: nginx honours X-Accel-Buffering,
    # and no-transform keeps compressing proxies from holding chunks back.
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
# Below the usual proxy idle timeouts (nginx and AWS ALB: 60 s).
KEEPALIVE_SECONDS = 15.0
Read = Callable[[int, float | None], Awaitable[list[Entry]]]


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
            # Let go of it: its CancelledError's traceback holds `_watch`'s frame, which holds this
            # watch, so a watch that still held the task would leave a reference cycle per request.
            self._task = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._on_disconnect()


class RunStream(Response):
    def __init__(
        self,
        runs: RunManager,
        meta: RunMeta,
        encoder: StreamEncoder,
        *,
        instead_of_error: Response | None = None,
        headers: dict[str, str] | None = None,
        skip_chars: int = 0,
        what: str = "",
    ) -> None:
        super().__init__()
        self.runs = runs
        self.meta = meta
        self.encoder = encoder
        # A run that failed before its answer started is answered with the error's status, or, for a
        # resume, with `instead_of_error`: a reload must not open the chat in its error state.
        self.instead_of_error = instead_of_error
        self.extra_headers = {**(headers or {}), "X-Run-Id": meta.run_id}
        self.skip = _CharSkip(skip_chars) if skip_chars else None
        self.what = what
        self.keepalive_seconds = min(KEEPALIVE_SECONDS, runs.max_seconds / 4)
        self.started = False
        self.opened = False  # the encoder's opening bytes are out
        self.sent_bytes = 0
        self.sent_chars = 0
        self.first_text_at: float | None = None
        self.end = "incomplete"
        self._left = anyio.CancelScope()
        # When the send in progress began (0: none is). `RunManager.watch_sends_forever` drops a
        # follower whose send has waited longer than the send timeout: one check a second for all
        # of them, rather than a timer armed and disarmed around every chunk.
        self.sending_since = 0.0
        self.too_slow = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runs = self.runs
        run = runs.live.get(self.meta.run_id)
        if run is not None and run.log is not None:
            run.attach()
            read: Read = run.log.read
        else:
            read = self._remote_read
            if runs.tracing is not None and self.meta.trace:
                runs.tracing.link_to_run(self.meta.trace)
        runs.followers.add(self)
        try:
            with self._left, DisconnectWatch(receive, self._left.cancel):
                await self._follow(scope, send, read, remote=run is None)
            if self.too_slow:
                self.end = "send_timeout"
            elif self._left.cancel_called and self.end == "incomplete":  # not once the answer was out
                self.end = "client_gone" if self.sent_chars else "client_gone_early"
        finally:
            runs.followers.discard(self)
            if run is not None and run.log is not None:
                run.detach()
            runs.metrics.bytes_relayed.inc(self.sent_bytes)
            request_context().relayed(
                self.what, self.meta.run_id, end=self.end, chars=self.sent_chars, first_byte_at=self.first_text_at
            )

    async def _remote_read(self, after: int, wait: float | None) -> list[Entry]:
        try:
            return await self.runs.logs.read(self.meta.run_id, after, wait)
        except StorageUnavailable:
            return [lost_entry()]

    async def _follow(self, scope: Scope, send: Send, read: Read, *, remote: bool) -> None:
        encoder = self.encoder
        consumed = 0
        keepalive_at = time.monotonic() + self.keepalive_seconds if encoder.keepalive is not None else None
        announce_at = 0.0
        while not self._left.cancel_called:
            # Checked each round, not only at a suspension: once the client left, a send returns at
            # once without sending, and a read that finds entries waiting never suspends, so a
            # follower of a run in full flow would otherwise never notice, nor let its run go.
            now = time.monotonic()
            wait: float | None = None
            if keepalive_at is not None and self.first_text_at is None:
                wait = max(0.0, keepalive_at - now)
            if remote:  # the producing replica must hear that we are here, or its grace runs out
                if now >= announce_at:
                    await self._announce()
                    announce_at = now + self.runs.follow_seconds
                wait = min(wait if wait is not None else announce_at - now, announce_at - now)
            entries = await read(consumed, wait)
            if not entries:
                if keepalive_at is not None and self.first_text_at is None and time.monotonic() >= keepalive_at:
                    assert encoder.keepalive is not None
                    await self._start(send)
                    await self._send(send, encoder.keepalive)
                    keepalive_at = time.monotonic() + self.keepalive_seconds
                continue
            consumed += len(entries)
            body, ending = self._encode(entries)
            if ending is not None:
                await self._finish(scope, send, body, ending)
                return
            await self._start(send)  # the upstream answered (`OPEN`), or text arrived
            if body:
                await self._send(send, body)

    def _encode(self, entries: list[Entry]) -> tuple[bytes, Ending | None]:
        encoder, out = self.encoder, []
        for kind, value in entries:
            if kind == TEXT:
                if self.skip is not None:
                    value = self.skip(value)
                if not value:
                    continue
                if not self.opened:
                    self.opened = True
                    out.append(encoder.open())
                if self.first_text_at is None:
                    self.first_text_at = time.monotonic()
                self.sent_chars += utf8_chars(value)
                out.append(encoder.chunk(value))
            elif kind == END:
                return b"".join(out), Ending.from_entry(value)
        return b"".join(out), None

    async def _finish(self, scope: Scope, send: Send, body: bytes, ending: Ending) -> None:
        encoder = self.encoder
        if ending.error is None:  # a clean end: the answer as far as it got
            if not self.opened:
                body += encoder.open()
            await self._start(send)
            await self._send(send, body + encoder.close(), more=False)
        elif not self.started and self.instead_of_error is not None:
            await self._bounded(self.instead_of_error({"type": "http"}, _no_receive, send))
        elif not self.started:
            await self._error(scope, send, ending.error)
        else:
            failure = encoder.fail(ending.inband)
            if failure is not None:
                await self._send(send, body + failure, more=False)
            elif body:
                await self._send(send, body)
            # Without a way to say it in-band, return without completing the body: the server drops
            # the connection, and a client sees a broken stream instead of a short answer that looks
            # complete.
        self.end = ending.reason  # the answer is out, however the run ended

    async def _announce(self) -> None:
        # One that fails is no reason to stop: the next may get through, and the grace covers the gap.
        with contextlib.suppress(StorageUnavailable):
            await self.runs.announce_follower(self.meta.run_id)

    async def _start(self, send: Send) -> None:
        if not self.started:
            self.started = True
            await self._bounded(send({"type": "http.response.start", "status": 200, "headers": self._start_headers()}))

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> None:
        self.sent_bytes += len(body)
        await self._bounded(send({"type": "http.response.body", "body": body, "more_body": more}))

    async def _error(self, scope: Scope, send: Send, error: ApiError) -> None:
        response = error_response(error, text=errors_as_text(scope))
        response.headers["X-Run-Id"] = self.meta.run_id
        await self._bounded(response({"type": "http"}, _no_receive, send))

    async def _bounded(self, sending: Awaitable[None]) -> None:
        self.sending_since = time.monotonic()
        await sending
        self.sending_since = 0.0

    def drop(self) -> None:
        """The client took no data for `BFF_SEND_TIMEOUT_SECONDS`: end this response, not the run."""
        self.too_slow = True
        self._left.cancel()

    def _start_headers(self) -> list[tuple[bytes, bytes]]:
        headers = {
            "Content-Type": self.encoder.media_type,
            **STREAM_HEADERS,
            **self.encoder.headers,
            **self.extra_headers,
        }
        return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class _CharSkip:
    """Drops the first `n` characters of a byte stream (`?from=N`), then passes the rest on as it
    came, including a character split across chunks."""

    def __init__(self, chars: int) -> None:
        self.left = chars
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, data: bytes) -> bytes:
        if self.left <= 0:
            return data
        text = self._decoder.decode(data)
        if len(text) < self.left:
            self.left -= len(text)
            return b""
        rest, pending = text[self.left :], self._decoder.getstate()[0]
        self.left = 0
        return rest.encode() + pending


async def _no_receive() -> dict[str, object]:  # pragma: no cover - a plain Response never reads
    return {"type": "http.disconnect"}
