"""Credentialed CORS for `BFF_ALLOWED_ORIGINS` only (CONTRACT B5, bff-security R13).

Off by default: same-origin deployment needs no CORS at all. Each allowed origin is matched exactly
(no wildcard, no pattern over subdomains) and echoed back with `Access-Control-Allow-Credentials`,
never `*`. A preflight from any other origin is refused with 403 `csrf_failed`, so the browser never
sends the real request; a simple request from another origin gets no CORS headers, so its script
cannot read the answer (and the CSRF policy refuses it anyway when it would change state).
"""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import ApiError, send_error
from proxy.middleware.response import on_response_start

ALLOWED_METHODS = "GET, POST"
# Authorization: POST /auth/exchange carries the identity provider's token in it.
ALLOWED_HEADERS = "Authorization, Content-Type, X-CSRF, X-Request-ID"
# What a cross-origin app needs to read: request ids for support, limits for back-off, the run id
# to resume or stop an answer.
EXPOSED_HEADERS = (
    "Retry-After, X-Error-Code, X-Request-ID, X-Run-Id, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"
)
PREFLIGHT_MAX_AGE = "600"


class CorsMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not async, and the inner app is not awaited here: see proxy/middleware/response.py.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if origin is None or origin not in self.allowed_origins:
            if preflight and origin is not None:
                error = ApiError(403, "csrf_failed", "This origin may not call this service.")
                return send_error(error, scope["path"], send)
            if self.allowed_origins:  # with CORS on, every answer depends on the Origin
                on_response_start(scope, _vary_on_origin)
            return self.app(scope, receive, send)
        if preflight:
            return self._preflight(origin)(scope, receive, send)

        def allow(message: Message) -> None:
            response_headers = MutableHeaders(scope=message)
            response_headers["Access-Control-Allow-Origin"] = origin
            response_headers["Access-Control-Allow-Credentials"] = "true"
            response_headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response_headers.add_vary_header("Origin")

        on_response_start(scope, allow)
        return self.app(scope, receive, send)

    def _preflight(self, origin: str) -> Response:
        return Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )


def _vary_on_origin(message: Message) -> None:
    MutableHeaders(scope=message).add_vary_header("Origin")
