"""`/api/runs/{runId}/*`: any relayed answer by its run id (CONTRACT C1), the `X-Run-Id` its response
carried. `GET .../stream?from=N` continues a plain-text answer from character N (after a dropped
connection, say), and `POST .../stop` ends it. Only for the run's owner: anyone else, like an
unknown or forgotten id, gets 404 `unknown_run`.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import INVALID_INPUT, UNKNOWN_RUN
from proxy.protocols import TextEncoder
from proxy.runs import RunStream
from proxy.services import Services, services
from proxy.storage.runlog import RunMeta


async def _owned_run(request: Request) -> tuple[Services, RunMeta]:
    bff = services(request)
    session = await bff.sessions.require(request)
    meta = await bff.runs.owned(request.path_params["run_id"], session.user.id)
    if meta is None:
        raise UNKNOWN_RUN.error()
    return bff, meta


async def follow(request: Request) -> Response:
    raw = request.query_params.get("from", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise INVALID_INPUT.error('"from" must be a whole number of characters, at least 0.')
    bff, meta = await _owned_run(request)
    return RunStream(bff.runs, meta, TextEncoder(), skip_chars=int(raw), what=f"resume:{meta.alias}:text")


async def stop(request: Request) -> Response:
    bff, meta = await _owned_run(request)
    await bff.runs.stop(meta.run_id)
    return Response(status_code=204, headers={"Cache-Control": "no-store"})


def run_routes(modes: Sequence[str]) -> list[Route]:
    if "relay" not in modes:
        return []
    return [
        Route("/api/runs/{run_id}/stream", follow, methods=["GET"]),
        Route("/api/runs/{run_id}/stop", stop, methods=["POST"]),
    ]
