"""`GET /api/usage` (CONTRACT C3): the signed-in user's own usage, as every replica counts it.

Today's output characters (the count the output budget charges, kept with a budget or without) and
what is left of the budget, each rate limit with what is left of its window, the stream slots in use,
and the answers still being generated. Reading it counts against no limit and keeps no session alive:
an app may poll it.
"""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.budget import next_midnight, today
from proxy.models import LimitUsage, OpenRun, OutputUsage, StreamUsage, Usage
from proxy.routes.auth import NO_STORE, iso
from proxy.services import Services, services
from proxy.sessions import Session


async def usage_of(bff: Services, session: Session) -> Usage:
    budget, counted = bff.budget, session.limit_key
    day = today()  # read first: a request at midnight reports the day it counted
    used = await budget.used(counted)
    # The limits a signed-in user's requests count against; sign-in's own (login) counts per address.
    names = [name for name, mode in (("mint", "token"), ("relay", "relay")) if mode in bff.settings.modes]
    windows = await bff.limiter.windows(names, counted)
    in_use, runs = await bff.runs.open_runs(session)
    limit = budget.daily_chars or None
    return Usage(
        day=day,
        counted_for="address" if counted != session.user.id else "user",
        output_chars=OutputUsage(
            used=used,
            limit=limit,
            left=None if limit is None else max(0, limit - used),
            renews_at=iso(next_midnight().timestamp()),
        ),
        limits=[
            LimitUsage(
                name=window.name,
                workflow=window.workflow,
                limit=window.limit,
                remaining=window.remaining,
                resets_at=iso(math.ceil(window.resets_at)),  # whole seconds, as X-RateLimit-Reset
            )
            for window in windows
        ],
        streams=StreamUsage(limit=bff.slots.limit, in_use=in_use),
        runs=[
            OpenRun(run_id=meta.run_id, chat_id=meta.chat_id, workflow=meta.alias, started_at=iso(meta.started_at))
            for meta in runs
        ],
    )


async def usage(request: Request) -> Response:
    bff = services(request)
    # touch=False: an app polling its usage must not keep an idle session alive.
    session = await bff.sessions.require(request, touch=False)
    return JSONResponse((await usage_of(bff, session)).model_dump(), headers=NO_STORE)


def usage_routes() -> list[Route]:
    return [Route("/api/usage", usage, methods=["GET"])]
