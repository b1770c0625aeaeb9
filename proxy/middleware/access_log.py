"""One summary line per request, written when the response, or the stream, has ended.

The line says what an operator needs to follow a request without reading anything private: method,
route template (never the raw path), status, the upstream's status when there was an upstream call,
time to first byte, duration, bytes sent, how it ended, a hash of the user and (added by the log
formatter) the request id. Never the API key, cookies, tokens, headers or bodies.

The code that knows more adds its fields with `annotate()`: the session layer the user hash, the
upstream client the upstream status, a relay its end reason, characters and first upstream byte. The
record lives in a contextvar set here, so any code running for the request, including the relay's
child tasks, writes into the same line. Relays are written once, here: this line is their "relay end".
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.middleware.response import ResponseRecord, response_record

logger = logging.getLogger("proxy.access")

# Probes and scrapes every few seconds would drown the requests that matter: logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_record_var: ContextVar[dict[str, object] | None] = ContextVar("access_record", default=None)


def annotate(**fields: object) -> None:
    """Add fields to the current request's summary line; does nothing outside a request."""
    record = _record_var.get()
    if record is not None:
        record.update(fields)


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
        record: dict[str, object] = {}
        token = _record_var.set(record)
        response = response_record(scope)
        status: int | None = None
        outcome = "incomplete"  # returned without finishing the body: the server drops the connection
        try:
            await self.app(scope, receive, send)
            if response.finished:
                outcome = "complete"
        except BaseException:
            # An exception here is answered 500 by Starlette's outermost handler, after this line.
            outcome = "error"
            if response.status is None:
                status = 500
            raise
        finally:
            _record_var.reset(token)
            self._write(scope, record, started, response, status or response.status, outcome)

    @staticmethod
    def _write(
        scope: Scope,
        record: dict[str, object],
        started: float,
        response: ResponseRecord,
        status: int | None,
        outcome: str,
    ) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # A relay's first byte is the upstream's first byte it passed on, not a keep-alive or its headers.
        first_byte = record.pop("first_byte_at", None) if "relay" in record else response.started_at
        end = record.pop("end", outcome)
        if status is None and end == "client_gone_early":
            status = 499  # nothing was sent; nginx logs the same for a client that closed the request
        line: dict[str, object] = {
            "method": scope["method"],
            "route": route,
            "status": status,
            "upstream_status": record.pop("upstream_status", None),
            "ttfb_ms": _ms(first_byte - started) if isinstance(first_byte, float) else None,
            "duration_ms": _ms(time.monotonic() - started),
            "bytes": response.sent,
            "end": end,
            "user_hash": record.pop("user_hash", None),
            **{name: value for name, value in record.items() if value is not None},
        }
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        logger.log(level, "request end", extra=line)
