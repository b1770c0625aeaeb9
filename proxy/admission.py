"""What a relay must pass before it starts, and what it owes when it ends (CONTRACT B5, B8).

In order: the user's output budget is not spent (read only), a stream slot is free, the rate limit
allows it. The rate limit is counted last, so a request refused for a full slot or a spent budget
does not also use up the user's rate; a refusal by the rate limit gives the slot back. While a relay
runs, the renewals of its slot also check that its session is still live (`Lease.watch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from proxy.errors import unauthenticated
from proxy.limits import Lease
from proxy.middleware.request_id import current_request_id
from proxy.protocols import StreamEncoder
from proxy.relay import RelayResponse, RelayStats
from proxy.services import Services
from proxy.sessions import Session
from proxy.workflows import Workflow


@dataclass(frozen=True)
class Admission:
    lease: Lease
    headers: dict[str, str]  # X-RateLimit-* for the response


async def admit(bff: Services, session: Session, workflow: Workflow) -> Admission:
    user_id = session.user.id
    await bff.budget.ensure_left(user_id)
    lease = await bff.slots.acquire(user_id)
    try:
        headers = await bff.limiter.check("relay", user_id, workflow=workflow.alias)
    except BaseException:
        await lease.release()
        raise
    return Admission(lease, headers)


async def relay_response(
    bff: Services, session: Session, workflow: Workflow, inputs: dict[str, str], what: str, encoder: StreamEncoder
) -> RelayResponse:
    """A relay of `workflow` run with `inputs`, with the user's policy applied; the budget is charged
    with what it relayed."""
    admission = await admit(bff, session, workflow)
    user_id = session.user.id
    request_id = current_request_id()

    async def open_upstream() -> httpx.Response:
        # Inside the relay, so a client that leaves while the token is minted cancels the mint too. The
        # relay has registered by now, so a logout from here on stops it; one since the session check
        # refuses it before anything is minted.
        if not await bff.sessions.still_valid(session):
            raise unauthenticated()
        minted = await bff.tokens.take(request_id=request_id)
        return await bff.upstream.open_stream(workflow.id, minted.token, inputs, request_id=request_id)

    async def charge(stats: RelayStats) -> None:
        await bff.budget.charge(user_id, stats.chars)

    async def session_live() -> bool:
        return await bff.storage.get_session(session.key) is not None

    response = RelayResponse(
        open_upstream,
        encoder,
        deadline=bff.settings.max_stream_seconds,
        description=what,
        owner=bff.sessions.stream_owner(session, what),
        headers=admission.headers,
        lease=admission.lease,
        metrics=bff.metrics,
        on_end=charge,
    )
    # A logout on another replica (or the session's absolute end) stops this relay too.
    admission.lease.watch(session_live, lambda: response.stop("revoked"))
    return response
