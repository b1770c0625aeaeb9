"""Give every request an id: the caller's `X-Request-ID` when it is sane, a new one otherwise.

The id is echoed in the response, forwarded upstream and put on every log line of the request.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.middleware.response import on_response_start

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if REQUEST_ID_PATTERN.fullmatch(offered) else secrets.token_hex(8)
        token = request_id_var.set(request_id)

        def add_id(message: Message) -> None:
            MutableHeaders(scope=message)["X-Request-ID"] = request_id

        on_response_start(scope, add_id)
        try:
            await self.app(scope, receive, send)
        finally:
            request_id_var.reset(token)
