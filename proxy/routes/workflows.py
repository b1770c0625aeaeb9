"""`/api/token` (token-mediating mode, CONTRACT B2) and `/api/workflows/*` (relay mode, B3)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admission import admit, relay_response
from proxy.body import read_json
from proxy.errors import client_gone, invalid_input, shutting_down
from proxy.middleware.access_log import annotate
from proxy.middleware.request_id import current_request_id
from proxy.protocols import TextEncoder
from proxy.relay import DisconnectWatch
from proxy.routes.auth import iso
from proxy.services import Services, services
from proxy.sessions import Session
from proxy.workflows import Workflow


async def mint(request: Request) -> Response:
    bff = services(request)
    session = await bff.sessions.require(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("workflow"), str):
        raise invalid_input('Send {"workflow": "<name>"} with an optional "ttl" in seconds.')
    unknown = sorted(set(body) - {"workflow", "ttl"})
    if unknown:
        raise invalid_input(f"Unknown field: {unknown[0][:64]!r}.")
    workflow = bff.workflows.get(body["workflow"])
    ttl = body.get("ttl", bff.settings.token_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise invalid_input('"ttl" must be a whole number of seconds, at least 1.')
    limit_headers = await bff.limiter.check("mint", session.user.id)
    if ttl >= bff.settings.token_ttl:
        minted = await bff.tokens.take(request_id=current_request_id())
    else:  # a shorter TTL than pooled tokens have: mint one to order
        minted = await bff.upstream.mint_token(ttl, request_id=current_request_id())
    remaining = max(1, round(minted.expires_at - time.time()))
    bff.sessions.audit.record(
        "token.minted",
        session.key,
        user_id=session.user.id,
        connection=request,
        workflow=workflow.alias,
        ttl=remaining,
    )
    return JSONResponse(
        {
            "token": minted.token,
            "ttl": remaining,
            "expires_at": iso(minted.expires_at),
            "stream_url": bff.upstream.stream_url(workflow.id, minted.token),
        },
        headers={"Cache-Control": "no-store", **limit_headers},
    )


async def _workflow_and_inputs(request: Request) -> tuple[Services, Session, Workflow, dict[str, str]]:
    bff = services(request)
    session = await bff.sessions.require(request)
    workflow = bff.workflows.get(request.path_params["alias"])
    body = await read_json(request)
    return bff, session, workflow, workflow.build_inputs(body, bff.settings.max_input_chars)


async def stream(request: Request) -> Response:
    bff, session, workflow, inputs = await _workflow_and_inputs(request)
    return await relay_response(bff, session, workflow, inputs, f"stream:{workflow.alias}", TextEncoder())


async def run(request: Request) -> Response:
    bff, session, workflow, inputs = await _workflow_and_inputs(request)
    admission = await admit(bff, session, workflow)
    request_id = current_request_id()
    async with admission.lease.held():
        with (
            bff.sessions.stream_owner(session, f"run:{workflow.alias}").cancellable() as stopped,
            # A client that leaves cancels the upstream run, as it does a stream.
            DisconnectWatch(request.receive, lambda: stopped.stop("client_gone")),
        ):
            if await bff.sessions.still_valid(session):  # registered: see admission.open_upstream
                result = await bff.upstream.run(workflow.id, inputs, request_id=request_id)
            else:
                stopped.stop("revoked")
    if stopped.reason == "revoked":
        raise bff.sessions.unauthenticated(request)
    if stopped.reason == "shutdown":
        raise shutting_down()
    if stopped.reason == "client_gone":
        annotate(end="client_gone")
        raise client_gone()
    await bff.budget.charge(session.user.id, len(result.result))
    return JSONResponse({"result": result.result, "citations": result.citations}, headers=admission.headers)


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
