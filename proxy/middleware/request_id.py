"""Give every request an id: the caller's `X-Request-ID` when it is sane, a new one otherwise.

The id is echoed in the response, kept in the request's context (proxy/context.py), from where it is
forwarded upstream and put on every log line of the request.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.context import ServingRequest

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if REQUEST_ID_PATTERN.fullmatch(offered) else secrets.token_hex(8)

        def send_with_id(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            return send(message)

        with ServingRequest() as context:
            context.request_id = request_id
            await self.app(scope, receive, send_with_id)
