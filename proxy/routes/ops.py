"""Operational routes (CONTRACT B7): liveness and readiness, exempt from auth, CSRF and limits."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.services import services

STORAGE_PING_SECONDS = 2.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    bff = services(request)
    if bff.drain.active:
        return JSONResponse({"status": "draining"}, 503)
    try:
        with anyio.fail_after(STORAGE_PING_SECONDS):
            await bff.storage.ping()
    except Exception:
        return JSONResponse({"status": "storage unreachable"}, 503)
    return JSONResponse({"status": "ready"})


async def index(request: Request) -> Response:
    """What a person who opens the service's address sees: what it is, and where to read on."""
    return JSONResponse(
        {
            "service": "workflow-bff",
            "version": __version__,
            "message": "Running. Browsers sign in at /auth/* and stream at /api/*; /openapi.json lists the routes.",
            "openapi": "/openapi.json",
            "health": "/healthz",
        }
    )


def ops_routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]


def index_route() -> Route:
    """`/`, listed after every other route, so that the demo's page takes it first."""
    return Route("/", index, methods=["GET"])
