"""CSRF and origin policy for every state-changing route (CONTRACT B5, bff-security R10-R12).

Three checks, all required: the static `X-CSRF: 1` header (a cross-origin page cannot send it without
a CORS preflight, which only `BFF_ALLOWED_ORIGINS` pass); `Sec-Fetch-Site: cross-site` or `same-site`
only from an allowed origin; and an `Origin`, when the browser sends one, that is this service's own
origin or an allowed one. A request with neither `Origin` nor `Sec-Fetch-Site` (curl, a server) is
let through on the header alone: browsers send at least one of them on every cross-origin POST.

One route is exempt: `POST /auth/backchannel-logout`, which the identity provider's server calls,
never a browser, with no header of ours; it proves itself with a signed logout token instead, and
changes nothing but ending sessions. The exemption is that exact method and path.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import CSRF_FAILED, send_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROTECTED_PREFIXES = ("/auth/", "/api/")
# `same-site` is another origin on our registrable domain, such as a sibling subdomain that someone
# else may run; it is treated like `cross-site` (OWASP: same-site is not same-origin).
FOREIGN_FETCH_SITES = frozenset({"cross-site", "same-site"})


BACKCHANNEL_LOGOUT_PATH = "/auth/backchannel-logout"


def is_backchannel_logout(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == BACKCHANNEL_LOGOUT_PATH)


def is_protected(scope: Scope) -> bool:
    """A state-changing request to our API: the requests every policy in this package guards."""
    return (
        scope["type"] == "http" and scope["method"] not in SAFE_METHODS and scope["path"].startswith(PROTECTED_PREFIXES)
    )


class CsrfMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self.problem(scope) if is_protected(scope) and not is_backchannel_logout(scope) else None
        if problem is not None:
            await send_error(CSRF_FAILED.error(problem), scope, send)
        else:
            await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        headers = Headers(scope=scope)
        if headers.get("x-csrf") != "1":
            return "The X-CSRF: 1 header is required."
        origin = headers.get("origin")
        allowed = origin is not None and origin in self.allowed_origins
        if headers.get("sec-fetch-site") in FOREIGN_FETCH_SITES and not allowed:
            return "Cross-site requests are not allowed."
        if origin is not None and not allowed and origin != own_origin(scope, headers):
            return "This origin is not allowed."
        return None


def own_origin(scope: Scope, headers: Headers) -> str:
    # scope["scheme"] already reflects X-Forwarded-Proto when the peer is a trusted proxy.
    return f"{scope['scheme']}://{headers.get('host', '')}"
