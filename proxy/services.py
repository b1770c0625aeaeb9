"""The per-process objects every route needs, created in the lifespan and reached via the request."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from proxy.budget import OutputBudget
from proxy.drain import Drain
from proxy.metrics import Metrics
from proxy.rate_limiter import RateLimiter
from proxy.runs import RunManager
from proxy.sessions import SessionManager
from proxy.settings import Settings
from proxy.slots import StreamSlots
from proxy.storage import Storage
from proxy.token_pool import TokenSource
from proxy.upstream import Upstream
from proxy.workflows import WorkflowRegistry


@dataclass
class Services:
    settings: Settings
    upstream: Upstream
    storage: Storage
    sessions: SessionManager
    workflows: WorkflowRegistry
    metrics: Metrics
    limiter: RateLimiter
    slots: StreamSlots
    budget: OutputBudget
    drain: Drain
    tokens: TokenSource
    runs: RunManager


def services(connection: HTTPConnection) -> Services:
    found = connection.state.services
    assert isinstance(found, Services)
    return found
