"""Prometheus metrics: what the service is doing, never who is doing it (no per-user labels).

Each app gets its own registry, so several apps can run side by side in one process (tests do).
With several worker processes, set `PROMETHEUS_MULTIPROC_DIR` to an empty directory before start:
`/metrics` then aggregates every worker's numbers.

Every labelled family is scraped from the start, with a zero for each value of its closed label set
(`_declare`): a dashboard or an alert rule can then be written, and checked against `/metrics`
(tests/test_dashboards.py), before the first failure, and `rate()` sees a failure's first increment.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Iterable
from typing import Any, Self

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# The closed label sets, each value scraped as 0 until it is counted.
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "4xx", "5xx", "cut", "circuit_open")
MINT_OUTCOMES = ("ok", "failed", "paused")
DISCONNECT_STAGES = ("before_first_byte", "after_first_byte")
BUDGET_OUTCOMES = ("deferred", "settled", "dropped")
SESSION_EVENTS = ("created", "renewed", "revoked")
# Run-end webhooks (proxy/events/): queued in the outbox, delivered (2xx), retried (an attempt failed),
# failed (the last attempt failed: given up), dropped (no room in memory or in the outbox).
EVENT_OUTCOMES = ("queued", "delivered", "retried", "failed", "dropped")
# An upstream call that got its answer's headers, by status class, or failed without one. The breaker's
# refusals send nothing and have no time to observe: `bff_upstream_errors{kind="circuit_open"}` counts them.
CALL_OUTCOMES = ("ok", "connect", "timeout", "4xx", "5xx")
CALL_OPERATIONS = ("mint", "stream", "run")
# A stream's first chunk arrived, or its answer broke off first; a `/run` answer is read in one piece.
FIRST_CHUNK_SERIES = (("stream", "ok"), ("stream", "cut"), ("run", "ok"))


def call_outcome(status: int) -> str:
    """What an upstream answer's status makes of the call, in `CALL_OUTCOMES`."""
    return "ok" if status < 400 else "4xx" if status < 500 else "5xx"


class _Children:
    """A labelled family whose children are looked up once per label values: prometheus_client's
    `labels()` checks the values and takes a lock on every call, and a relay asks for seven."""

    def labels(self, *values: Any, **by_name: Any) -> Self:
        children: dict[tuple[Any, ...], Self] = self.__dict__.setdefault("_children", {})
        child = None if by_name else children.get(values)
        if child is None:
            child = super().labels(*values, **by_name)  # type: ignore[misc]
            if not by_name:
                children[values] = child
        return child


class _Counter(_Children, Counter):
    pass


class _Histogram(_Children, Histogram):
    pass


class Metrics:
    """`rate_limits` and `stream_ends` are the label values of those families known at start-up (the
    configured limits' names, the run end reasons); a `refused:<code>` end is scraped once it happened."""

    def __init__(self, *, rate_limits: Iterable[str] = (), stream_ends: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Counter(
            "bff_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.open_streams = Gauge(
            "bff_open_streams", "Relayed streams open right now.", registry=r, multiprocess_mode="livesum"
        )
        self.first_byte = _Histogram(
            "bff_stream_first_byte_seconds",
            "Time from request to the first relayed byte.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = _Histogram(
            "bff_stream_duration_seconds", "Duration of relayed streams.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.bytes_relayed = _Counter("bff_relayed_bytes", "Bytes relayed to browsers.", registry=r)
        self.chars_relayed = _Counter("bff_relayed_chars", "Characters of generated text relayed.", registry=r)
        self.stream_ends = _Counter("bff_stream_ends", "Relayed streams by how they ended.", ["end"], registry=r)
        self.disconnects = _Counter(
            "bff_client_disconnects", "Clients that left mid-relay, by stage.", ["stage"], registry=r
        )
        self.upstream_errors = _Counter(
            "bff_upstream_errors",
            "Upstream failures by class (connect, timeout, 4xx, 5xx, cut, circuit_open).",
            ["kind"],
            registry=r,
        )
        self.mints = _Counter("bff_mints", "Upstream stream tokens minted, by outcome.", ["outcome"], registry=r)
        self.rate_limited = _Counter(
            "bff_rate_limited", "Requests refused by a limit, by limit.", ["limit"], registry=r
        )
        self.budget_charges = _Counter(
            "bff_budget_charged_chars",
            "Output budget charges the storage could not take at once: deferred, later settled, or dropped.",
            ["outcome"],
            registry=r,
        )
        self.sessions = _Counter("bff_session_events", "Session events (created, revoked, ...).", ["event"], registry=r)
        self.events = _Counter("bff_events", "Run-end webhook events by outcome.", ["outcome"], registry=r)
        self.upstream_mint = _Histogram(
            "bff_upstream_mint_seconds",
            "Time to mint a stream token, retries included, by outcome (ok, failed).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_headers = _Histogram(
            "bff_upstream_headers_seconds",
            "Time from an upstream request to its answer's headers, by operation and outcome.",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_first_chunk = _Histogram(
            "bff_upstream_first_chunk_seconds",
            "Time from an upstream request to its answer's first chunk (a /run answer: all of it).",
            ["operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # `bff_requests` is left out: route x method x status is mostly combinations that never happen,
        # and each route's series appears with its first answer (a scrape is one), which `rate()` by
        # route handles as it handles a new replica.
        _declare(self.upstream_errors, UPSTREAM_ERROR_KINDS)
        _declare(self.mints, MINT_OUTCOMES)
        _declare(self.disconnects, DISCONNECT_STAGES)
        _declare(self.budget_charges, BUDGET_OUTCOMES)
        _declare(self.sessions, SESSION_EVENTS)
        _declare(self.rate_limited, rate_limits)
        _declare(self.stream_ends, stream_ends)
        _declare(self.upstream_mint, ("ok", "failed"))
        _declare(self.upstream_headers, [(op, outcome) for op in CALL_OPERATIONS for outcome in CALL_OUTCOMES])
        _declare(self.upstream_first_chunk, FIRST_CHUNK_SERIES)
        _declare(self.events, EVENT_OUTCOMES)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def _declare(family: Counter | Histogram, values: Iterable[str | tuple[str, ...]]) -> None:
    """Create a child for each label value (or tuple of values): scraped as zeros from now on (in
    multiprocess mode too: creating a child writes its zeros to this process's file)."""
    for value in values:
        family.labels(*((value,) if isinstance(value, str) else value))


class MetricsMiddleware:
    """Counts every response by route template (never the raw path: ids would explode cardinality)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        def send_counted(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                # The router has put the matched route into the scope by the time the response starts.
                template = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.requests.labels(template, scope["method"], str(message["status"])).inc()
            return send(message)

        await self.app(scope, receive, send_counted)


class MetricsPortMiddleware:
    """`BFF_METRICS_PORT`: `/metrics` only on that listener, and nothing else there, so metrics never
    share the public listener (which then answers 404 for them), whatever the proxy in front does."""

    def __init__(self, app: ASGIApp, *, port: int) -> None:
        self.app = app
        self.port = port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            on_metrics_port = server is not None and server[1] == self.port
            if on_metrics_port != (scope["path"] == "/metrics"):
                await Response("Not Found", 404, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def metrics_route(metrics: Metrics) -> Route:
    async def endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint, methods=["GET"])
