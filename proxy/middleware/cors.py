"""Credentialed CORS for `BFF_ALLOWED_ORIGINS` only (CONTRACT B5, bff-security R13).

Off by default: same-origin deployment needs no CORS at all. Each allowed origin is matched exactly
(no wildcard, no pattern over subdomains) and echoed back with `Access-Control-Allow-Credentials`,
never `*`. A preflight from any other origin is refused with 403 `csrf_failed`, so the browser never
sends the real request; a simple request from another origin gets no CORS headers, so its script
cannot read the answer (and the CSRF policy refuses it anyway when it would change state). With CORS
on, every answer says `Vary: Origin`, since it depends on the origin.

Not Starlette's `CORSMiddleware`, which matches origins exactly too, but cannot give these answers:
it refuses a preflight with a 400 in plain text that still carries `Access-Control-Allow-*` headers
(ours is the 403 `csrf_failed` of the error format, with none), it sends
`Access-Control-Allow-Credentials` and `Access-Control-Expose-Headers` to origins it refuses, it
answers an accepted preflight 200 rather than 204.
"""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import CSRF_FAILED, send_error

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if origin is not None and origin in self.allowed_origins:
            if preflight:
                await self._preflight(origin)(scope, receive, send)
            else:
                await self.app(scope, receive, _allowing(origin, send))
        elif preflight and origin is not None:
            await send_error(CSRF_FAILED.error("This origin may not call this service."), scope, send)
        elif self.allowed_origins:
            await self.app(scope, receive, _varying_on_origin(send))
        else:
            await self.app(scope, receive, send)

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


def _allowing(origin: str, send: Send) -> Send:
    def send_allowing(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Allow-Credentials"] = "true"
            headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            headers.add_vary_header("Origin")
        return send(message)

    return send_allowing


def _varying_on_origin(send: Send) -> Send:
    def send_varying(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message).add_vary_header("Origin")
        return send(message)

    return send_varying
