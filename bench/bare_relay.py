"""A bare streaming relay: Starlette + one HTTP client, no sessions, no middleware, no token mint.

It is the floor a Python relay can reach with a given client library, measured beside workflow-bff
so the cost of our own stack (sessions, CSRF, limits, metrics, logging) shows apart from the cost
of the library. It relays `POST /api/v1/run/{id}/stream?token=...` to the upstream unchanged.

    python -m bench.bare_relay --client aiohttp|httpx --upstream http://127.0.0.1:PORT [--port 0]
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

POOL_SIZE = 1000


def aiohttp_app(upstream: str) -> Starlette:
    import aiohttp

    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            state["session"] = session
            yield

    async def stream(request: Request) -> Response:
        response = await state["session"].post(
            upstream + request.url.path,
            params=request.query_params,
            data=await request.body(),
            headers={"Content-Type": "application/json"},
        )

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in response.content.iter_any():
                    yield data
            finally:
                response.release()

        return StreamingResponse(body(), response.status, media_type=response.content_type)

    return Starlette(routes=[Route("/api/v1/run/{id}/stream", stream, methods=["POST"])], lifespan=lifespan)


def httpx_app(upstream: str) -> Starlette:
    import httpx

    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
            state["client"] = client
            yield

    async def stream(request: Request) -> Response:
        client = state["client"]
        upstream_request = client.build_request(
            "POST",
            upstream + request.url.path,
            params=request.query_params,
            content=await request.body(),
            headers={"Content-Type": "application/json"},
        )
        response = await client.send(upstream_request, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in response.aiter_raw():
                    yield data
            finally:
                await response.aclose()

        return StreamingResponse(body(), response.status_code, media_type=response.headers.get("content-type"))

    return Starlette(routes=[Route("/api/v1/run/{id}/stream", stream, methods=["POST"])], lifespan=lifespan)


APPS: dict[str, Callable[[str], Starlette]] = {"aiohttp": aiohttp_app, "httpx": httpx_app}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_relay")
    parser.add_argument("--client", choices=sorted(APPS), required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)  # listening before the port is announced, so no early connect is refused
    config: dict[str, Any] = {"log_config": None, "access_log": False, "timeout_keep_alive": 75}
    server = uvicorn.Server(uvicorn.Config(APPS[args.client](args.upstream.rstrip("/")), **config))
    print(json.dumps({"listening": sock.getsockname()[1]}), flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
