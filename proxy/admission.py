"""What a relay must pass before it starts, and what it owes when it ends (CONTRACT B5, B8).

In order: the user's output budget is not spent (read only), a stream slot is free, the rate limit
allows it. The rate limit is counted last, so a request refused for a full slot or a spent budget
does not also use up the user's rate; a refusal by the rate limit gives the slot back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from proxy.limits import Lease
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
    bff: Services,
    session: Session,
    workflow: Workflow,
    what: str,
    open_upstream: Callable[[], Awaitable[httpx.Response]],
    encoder: StreamEncoder,
) -> RelayResponse:
    """A relay with the user's policy applied; the budget is charged with what it relayed."""
    admission = await admit(bff, session, workflow)
    user_id = session.user.id

    async def charge(stats: RelayStats) -> None:
        await bff.budget.charge(user_id, stats.chars)

    return RelayResponse(
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
