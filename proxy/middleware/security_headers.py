"""Security headers on every response (bff-security R29). The demo page sets its own CSP on top."""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.middleware.response import on_response_start

BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "frame-ancestors 'none'",
}
HSTS = "max-age=63072000; includeSubDomains"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.headers = {**BASE_HEADERS, **({"Strict-Transport-Security": HSTS} if hsts else {})}

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            on_response_start(scope, self._add_headers)
        return self.app(scope, receive, send)  # not awaited here: see proxy/middleware/response.py

    def _add_headers(self, message: Message) -> None:
        headers = MutableHeaders(scope=message)
        for name, value in self.headers.items():
            if name not in headers:
                headers[name] = value
