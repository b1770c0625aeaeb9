"""The demo page at `/` (only in `python -m proxy demo`)."""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# A strict CSP: no inline script or style, and the page may only talk to its own origin.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}


def demo_routes() -> list[Route]:
    static = files("proxy") / "static"

    def serve(name: str, media_type: str) -> Route:
        content = (static / name).read_bytes()

        async def endpoint(request: Request) -> Response:
            headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
            return Response(content, media_type=media_type, headers=headers)

        return endpoint  # type: ignore[return-value]

    return [Route(path, serve(name, media_type), methods=["GET"]) for path, (name, media_type) in ASSETS.items()]
