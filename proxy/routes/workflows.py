"""`/api/token` (token-mediating mode, CONTRACT B2) and `/api/workflows/*` (relay mode, B3)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import MISSING
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.body import read_json
from proxy.context import request_context
from proxy.errors import ClientGone
from proxy.models import RunResult, Token, TokenRequest
from proxy.protocols import TextEncoder
from proxy.routes.auth import iso
from proxy.runs import DisconnectWatch, RunRequest, RunStream
from proxy.services import services


async def mint(request: Request) -> Response:
    bff = services(request)
    session = await bff.sessions.require(request)
    asked = TokenRequest.parse_for(await read_json(request), bff.workflows.get)
    workflow = bff.workflows.get(asked.workflow)
    ttl = asked.ttl if asked.ttl is not MISSING else bff.settings.token_ttl
    limit_headers = await bff.limiter.check("mint", session.limit_key)
    if ttl >= bff.settings.token_ttl:
        minted = await bff.tokens.take(request_id=request_context().request_id)
    else:  # a shorter TTL than pooled tokens have: mint one to order
        minted = await bff.upstream.mint_token(ttl, request_id=request_context().request_id)
    remaining = max(1, round(minted.expires_at - time.time()))
    bff.sessions.audit.record(
        "token.minted",
        session.key,
        user_id=session.user.id,
        connection=request,
        workflow=workflow.alias,
        ttl=remaining,
    )
    token = Token(
        token=minted.token,
        ttl=remaining,
        expires_at=iso(minted.expires_at),
        stream_url=bff.upstream.stream_url(workflow.id, minted.token),
    )
    return JSONResponse(token.model_dump(), headers={"Cache-Control": "no-store", **limit_headers})


async def _run_request(request: Request, kind: str, *, streamed: bool) -> RunRequest:
    """The workflow the path names (404) with its inputs from the body (400)."""
    bff = services(request)
    workflow = bff.workflows.get(request.path_params["alias"])
    body = await read_json(request)
    inputs = workflow.build_inputs(body, bff.settings.max_input_chars)
    return RunRequest(workflow, inputs, f"{kind}:{workflow.alias}", streamed=streamed)


async def stream(request: Request) -> Response:
    bff = services(request)
    run = await bff.runs.open(request, lambda: _run_request(request, "stream", streamed=True))
    return RunStream(bff.runs, run.meta, TextEncoder(), headers=run.headers, what=run.request.what)


async def run(request: Request) -> Response:
    bff = services(request)
    run = await bff.runs.open(request, lambda: _run_request(request, "run", streamed=False))
    what = run.request.what
    # A client that leaves cancels the upstream run: there is no log to come back to.
    with DisconnectWatch(request.receive, lambda: run.stop("client_gone")):
        await run.done.wait()
    ending, result = run.ending, run.result
    assert ending is not None
    request_context().relayed(what, run.id, end=ending.reason, chars=run.stats.chars)
    if ending.nobody_left:
        raise ClientGone
    if ending.reason == "revoked":
        raise bff.sessions.unauthenticated(request)
    if ending.error is not None:
        raise ending.error
    assert result is not None
    answer = RunResult(result=result.result, citations=result.citations)
    return JSONResponse(answer.model_dump(), headers={**run.headers, "X-Run-Id": run.id})


def workflow_routes(modes: Sequence[str]) -> list[Route]:
    routes = []
    if "token" in modes:
        routes.append(Route("/api/token", mint, methods=["POST"]))
    if "relay" in modes:
        routes += [
            Route("/api/workflows/{alias}/stream", stream, methods=["POST"]),
            Route("/api/workflows/{alias}/run", run, methods=["POST"]),
        ]
    return routes
