"""`BFF_ALLOWED_HOSTS`: answer only for the host names this service is deployed under (CONTRACT C4).

The origin check (proxy/middleware/csrf.py) compares a request's `Origin` with its own `Host`, so a
page on `evil.example` whose name an attacker points at this service (DNS rebinding, which matters
for plain-http and internal deployments) would pass it: `Host: evil.example`, `Origin:
http://evil.example`. Refusing unknown hosts first closes that. The rules are Starlette's
`TrustedHostMiddleware`'s (exact names, `*.example.com` for subdomains, the port not compared); ours
answers with the service's error format, and lets the operational routes through, since orchestrators
probe them by pod address.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import INVALID_HOST, send_error

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = host if host.endswith("]") else host.rsplit(":", 1)[0]  # the port is not compared; [::1] keeps its colons
    name = name.lower().rstrip(".")
    return any(pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])) for pattern in allowed)


class AllowedHostsMiddleware:
    def __init__(self, app: ASGIApp, *, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = [host.lower().rstrip(".") for host in allowed_hosts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = scope["type"] == "http" and scope["path"] not in PROBE_PATHS
        if checked and not host_allowed(Headers(scope=scope).get("host", ""), self.allowed):
            await send_error(INVALID_HOST.error(), scope, send)
        else:
            await self.app(scope, receive, send)
