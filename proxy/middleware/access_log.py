"""One summary line per request, written when the response, or the stream, has ended.

The line says what an operator needs to follow a request without reading anything private: method,
route template (never the raw path), status, the upstream's status when there was an upstream call,
time to first byte, duration, bytes sent, how it ended, a hash of the user and (added by the log
formatter) the request id. Never the API key, cookies, tokens, headers or bodies.

The code that knows more writes it into the request's context (proxy/context.py): the session layer
the user hash, the upstream client the upstream status, a relay its end reason, characters and first
upstream byte. Relays are written once, here: this line is their "relay end".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.context import RequestContext, ServingRequest

logger = logging.getLogger("proxy.access")

# Probes and scrapes every few seconds would drown the requests that matter: logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(slots=True, eq=False)
class SentResponse:
    """A `send` that keeps what went out of one response: its status, when it started, the body bytes."""

    send: Send
    status: int | None = None
    started_at: float | None = None  # time.monotonic() of the response start
    sent: int = 0
    finished: bool = False  # the last body message went out

    def __call__(self, message: Message) -> Awaitable[None]:
        # Returns the inner send's awaitable rather than awaiting it: no frame of its own per chunk.
        if message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)
        elif message["type"] == "http.response.start":
            self.status = message["status"]
            self.started_at = time.monotonic()
        return self.send(message)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        response = SentResponse(send)
        status: int | None = None
        outcome = "incomplete"  # returned without finishing the body: the server drops the connection
        with ServingRequest() as context:
            try:
                await self.app(scope, receive, response)
                if response.finished:
                    outcome = "complete"
            except BaseException:
                # An exception here is answered 500 by Starlette's outermost handler, after this line.
                outcome = "error"
                if response.status is None:
                    status = 500
                raise
            finally:
                self._write(scope, context, started, response, status or response.status, outcome)

    @staticmethod
    def _write(
        scope: Scope,
        context: RequestContext,
        started: float,
        response: SentResponse,
        status: int | None,
        outcome: str,
    ) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # A relay's first byte is the upstream's first byte it passed on, not a keep-alive or its headers.
        first_byte = context.first_byte_at if context.relay is not None else response.started_at
        end = context.end or outcome
        if status is None and end in ("client_gone", "client_gone_early"):
            status = 499  # nothing was sent; nginx logs the same for a client that closed the request
        line: dict[str, object] = {
            "method": scope["method"],
            "route": route,
            "status": status,
            "upstream_status": context.upstream_status,
            "ttfb_ms": _ms(first_byte - started) if first_byte is not None else None,
            "duration_ms": _ms(time.monotonic() - started),
            "bytes": response.sent,
            "end": end,
            "user_hash": context.user_hash,
        }
        optional = {
            "upstream_error": context.upstream_error,
            "relay": context.relay,
            "run_id": context.run_id,
            "chars": context.chars,
            "trace_id": context.trace_id,
        }
        line.update((name, value) for name, value in optional.items() if value is not None)
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        logger.log(level, "request end", extra=line)
