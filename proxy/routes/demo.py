"""The demo page at `/` (only in `python -m proxy demo`)."""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.routes.auth import NO_STORE, session_body
from proxy.services import services

# A strict CSP: no inline script or style, and the page may only talk to its own origin.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),  # for clients that ask before reading the page
}


async def demo_session(request: Request) -> Response:
    """The page's start-up check: this browser's session, or `{"user": null}`, both with a 200.
    `GET /auth/session` answers 401 without one (its contract), which a browser logs as a console error
    on every first visit; the page signs in as a guest when this says there is no session. Also says
    which modes the server serves, so the page offers only those, and where to sign in with the
    identity provider when OpenID Connect is configured (`sign_in`, else null)."""
    bff = services(request)
    session = await bff.sessions.current(request, touch=False)
    body = await session_body(bff, session) if session is not None else {"user": None}
    sign_in = "/auth/login" if "oidc" in bff.settings.auth else None
    return JSONResponse({**body, "modes": list(bff.settings.modes), "sign_in": sign_in}, headers=NO_STORE)


def demo_routes() -> list[Route]:
    static = files("proxy") / "static"

    def serve(name: str, media_type: str) -> Route:
        content = (static / name).read_bytes()

        async def endpoint(request: Request) -> Response:
            headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
            return Response(content, media_type=media_type, headers=headers)

        return endpoint  # type: ignore[return-value]

    assets = [Route(path, serve(name, media_type), methods=["GET"]) for path, (name, media_type) in ASSETS.items()]
    return [*assets, Route("/demo/session", demo_session, methods=["GET"])]
