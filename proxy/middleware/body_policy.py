"""Bodies of state-changing API requests: JSON only, and never more than `BFF_MAX_BODY_BYTES`.

JSON-only is a CSRF defence as much as hygiene (bff-security R11): `text/plain`, form and multipart
bodies are what a cross-site form can send without a preflight. The size cap is enforced here for
every route, before any route reads a byte: a declared `Content-Length` over the cap is refused at
once, and a chunked body is counted as it is read and refused the moment it passes the cap.

The back-channel logout route is the one exception to JSON-only: OpenID Connect Back-Channel Logout
has the provider POST a form (`logout_token=...`), so that route takes a form, of at most 16 KiB.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import BODY_TOO_LARGE, INVALID_INPUT, ApiError, send_error
from proxy.middleware.csrf import is_backchannel_logout, is_protected

JSON_MEDIA_TYPE = "application/json"
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
BACKCHANNEL_MAX_BYTES = 16 * 1024


def too_large(max_bytes: int) -> ApiError:
    return BODY_TOO_LARGE.error(f"The body is larger than {max_bytes} bytes.")


class BodyPolicyMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_protected(scope):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        backchannel = is_backchannel_logout(scope)
        media_type_wanted = FORM_MEDIA_TYPE if backchannel else JSON_MEDIA_TYPE
        max_bytes = min(self.max_bytes, BACKCHANNEL_MAX_BYTES) if backchannel else self.max_bytes
        declared = headers.get("content-length")
        has_body = "transfer-encoding" in headers or declared not in (None, "0")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        problem: ApiError | None = None
        if has_body and media_type != media_type_wanted:
            problem = INVALID_INPUT.error(f"Send the body as {media_type_wanted}.")
        elif declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
            problem = too_large(max_bytes)
        if problem is not None:
            await send_error(problem, scope, send)
            return

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    # Raised into the route that is reading the body; its error handler answers 413.
                    raise too_large(max_bytes)
            return message

        await self.app(scope, counted_receive, send)
