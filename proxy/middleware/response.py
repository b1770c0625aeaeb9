"""One `send` wrapper for the whole middleware stack.

The request id, security headers, CORS and metrics only need to see (or add headers to) the start of
a response, and the access log only needs the status and the bytes sent. Each used to wrap `send`, so
every chunk of every stream went through five wrappers. Now the outermost middleware wraps `send`
once and keeps that record; the others register a hook for the response start.

Those others are plain functions, not coroutines: they return the inner app's awaitable instead of
awaiting it. Awaited, each would keep a suspended frame on the stack for as long as the response
runs, which for a stream is minutes, on every open stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "bff.response"
StartHook = Callable[[Message], None]


@dataclass(eq=False)
class ResponseRecord:
    """What was sent of one response, kept as it goes out."""

    start_hooks: list[StartHook] = field(default_factory=list)
    status: int | None = None
    started_at: float | None = None  # time.monotonic() of the response start
    sent: int = 0  # body bytes
    finished: bool = False  # the last body message went out


def response_record(scope: Scope) -> ResponseRecord:
    record: ResponseRecord = scope[SCOPE_KEY]
    return record


def on_response_start(scope: Scope, hook: StartHook) -> None:
    """Call `hook` with the `http.response.start` message before it is sent; it may add headers.
    Hooks registered by inner middleware run first, as their own `send` wrappers did."""
    response_record(scope).start_hooks.append(hook)


class ResponseMiddleware:
    """Outermost of ours: wraps `send` once for every middleware inside it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[SCOPE_KEY] = ResponseRecord()

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                record.sent += len(message.get("body", b""))
                record.finished = not message.get("more_body", False)
            elif message["type"] == "http.response.start":
                record.status = message["status"]
                record.started_at = time.monotonic()
                for hook in reversed(record.start_hooks):
                    hook(message)
            await send(message)

        await self.app(scope, receive, recording_send)
