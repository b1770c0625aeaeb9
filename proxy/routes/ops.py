"""Operational routes (CONTRACT B7): liveness and readiness, exempt from auth, CSRF and limits."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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


def ops_routes() -> list[Route]:
    return [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"])]
