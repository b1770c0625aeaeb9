"""Composition only: settings in, a Starlette app out. No logic lives here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from proxy.auth import build_authenticators, build_oidc
from proxy.auth.password import PasswordAuthenticator
from proxy.auth.refresh import TokenRefresher
from proxy.budget import OutputBudget
from proxy.drain import Drain
from proxy.errors import ApiError, ClientGone, handle_api_error, handle_client_gone
from proxy.events import DeliverySettings, RunEvents, webhook_key
from proxy.limits import parse_limit, parse_rate_limits
from proxy.metrics import Metrics, MetricsMiddleware, MetricsPortMiddleware, metrics_route
from proxy.middleware.access_log import AccessLogMiddleware
from proxy.middleware.body_policy import BodyPolicyMiddleware
from proxy.middleware.cors import CorsMiddleware
from proxy.middleware.csrf import CsrfMiddleware
from proxy.middleware.hosts import AllowedHostsMiddleware
from proxy.middleware.request_id import RequestIdMiddleware
from proxy.middleware.security_headers import SecurityHeadersMiddleware
from proxy.openapi import openapi_route
from proxy.rate_limiter import RateLimiter
from proxy.routes.auth import auth_routes
from proxy.routes.chat import chat_routes
from proxy.routes.ops import index_route, ops_routes
from proxy.routes.runs import run_routes
from proxy.routes.usage import usage_routes
from proxy.routes.workflows import workflow_routes
from proxy.runs import RunManager, RunSettings
from proxy.runs.ending import REASONS
from proxy.sealing import TokenSealer
from proxy.services import Services
from proxy.sessions import SessionManager
from proxy.settings import Settings
from proxy.slots import StreamSlots
from proxy.storage import Storage, open_limits_storage, open_run_logs, open_storage
from proxy.storage.redis import RedisStorage
from proxy.token_pool import TokenSource
from proxy.tracing import open_tracing
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.client import HttpUpstream
from proxy.workflows import parse_workflows


def create_app(settings: Settings, *, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    if settings.api_key is None:
        raise ValueError("BFF_API_KEY is required")
    api_key = settings.api_key
    workflows = parse_workflows(settings.workflows, settings.workflows_file)
    rate_limits = parse_rate_limits(settings.rate_limits)
    metrics = Metrics(rate_limits=rate_limits, stream_ends=REASONS)
    drain = Drain(settings.drain_seconds)
    limits_storage = open_limits_storage(settings.storage_url)
    limiter = RateLimiter(
        limits_storage,
        rate_limits,
        per_workflow={w.alias: parse_limit(w.rate_limit) for w in workflows if w.rate_limit},
        metrics=metrics,
    )

    authenticators = build_authenticators(settings, limits_storage)
    oidc = build_oidc(settings)
    # None unless the OTEL_* variables ask for tracing: then nothing of OpenTelemetry is even imported.
    tracing = open_tracing(settings, os.environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        if tracing is not None:
            tracing.start()
        storage = open_storage(settings.storage_url)
        if tracing is not None and isinstance(storage, RedisStorage):
            tracing.instrument_redis(storage.client)
        secrets = [secret.get_secret_value() for secret in settings.session_secrets]
        refresh = TokenRefresher(oidc, storage, TokenSealer(secrets)) if oidc is not None else None
        sessions = SessionManager(
            storage,
            secrets,
            idle_seconds=settings.session_idle_seconds,
            max_seconds=settings.session_max_seconds,
            cookie_secure=settings.cookie_secure,
            samesite=settings.cookie_samesite,
            metrics=metrics,
            guests_share_ip=settings.guest_limits == "ip",
            idp_refresh=refresh,
        )
        upstream = HttpUpstream(
            settings.upstream_url,
            api_key,
            max_stream_seconds=settings.max_stream_seconds,
            metrics=metrics,
            breaker=CircuitBreaker(settings.upstream_failure_threshold, settings.upstream_cooldown_seconds),
            tracing=tracing,
        )
        tokens = TokenSource(upstream, settings.token_ttl, settings.token_pool)
        slots = StreamSlots(storage, settings.max_concurrent_streams, lease_seconds=settings.stream_lease_seconds)
        budget = OutputBudget(storage, settings.daily_output_chars, metrics=metrics)
        run_logs = open_run_logs(settings.storage_url, alive_seconds=settings.stream_lease_seconds)
        events = run_events(settings, storage, metrics)
        runs = RunManager(
            RunSettings(
                max_seconds=settings.max_stream_seconds,
                grace_seconds=settings.resume_grace_seconds,
                resume_seconds=settings.resume_seconds,
                max_bytes=settings.max_answer_bytes,
                send_timeout=settings.send_timeout_seconds,
            ),
            logs=run_logs,
            storage=storage,
            sessions=sessions,
            upstream=upstream,
            tokens=tokens,
            slots=slots,
            limiter=limiter,
            budget=budget,
            metrics=metrics,
            events=events,
            tracing=tracing,
        )
        services = Services(
            settings=settings,
            upstream=upstream,
            tokens=tokens,
            metrics=metrics,
            limiter=limiter,
            slots=slots,
            budget=budget,
            drain=drain,
            storage=storage,
            sessions=sessions,
            workflows=workflows,
            runs=runs,
        )
        drain.attach(asyncio.get_running_loop(), sessions.streams.stop_all)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(runs.keep_forever)
                background.start_soon(runs.listen_forever)
                background.start_soon(runs.watch_sends_forever)
                background.start_soon(budget.settle_forever)  # output is counted with a budget or without
                for authenticator in authenticators:
                    if isinstance(authenticator, PasswordAuthenticator):
                        background.start_soon(sessions.watch_users_forever, authenticator.changed_users)
                if settings.token_pool:
                    background.start_soon(tokens.refill_forever)
                if events is not None:
                    background.start_soon(events.pump_forever)
                    background.start_soon(events.deliver_forever)
                yield {"services": services}
                await runs.close()
                if events is not None:
                    await events.flush()  # the ends of the runs just stopped included
                background.cancel_scope.cancel()
        finally:
            drain.active = True
            tokens.close()
            await upstream.aclose()
            if events is not None:
                await events.aclose()
            await run_logs.close()
            await storage.close()
            if tracing is not None:
                await tracing.shutdown()  # the last spans are exported before the process ends

    # The relays first: a request is matched against the routes in order, one regular expression each,
    # and no two of these paths overlap, so the order only decides how many a relay is tried against.
    routes: list[BaseRoute] = [
        *workflow_routes(settings.modes),
        *chat_routes(settings.modes),
        *run_routes(settings.modes),
        *ops_routes(),
        metrics_route(metrics),
        openapi_route(),
        *auth_routes(authenticators, oidc),
        *usage_routes(),
        *(extra_routes or []),
        index_route(),
    ]
    # Listed outermost first. Each works alone, whatever is around it; the order is chosen. Those that
    # add to every answer come first, so that the refusals of the checks after them are logged,
    # counted and carry the headers too. Forwarded headers are believed only from BFF_TRUSTED_PROXIES, so the CSRF check
    # sees the scheme the browser used. CORS answers preflights before the CSRF check, and wraps it so
    # an allowed origin can read a refusal.
    # The server span wraps everything else, so a refusal by any check is traced too; it sits outside
    # the forwarded headers' middleware, so it sees the TCP peer it decides to trust or not.
    middleware = [
        *([Middleware(MetricsPortMiddleware, port=settings.metrics_port)] if settings.metrics_port else []),
        *([tracing.middleware()] if tracing is not None else []),
        Middleware(RequestIdMiddleware),
        Middleware(AccessLogMiddleware),
        Middleware(MetricsMiddleware, metrics=metrics),
        Middleware(SecurityHeadersMiddleware, hsts=settings.cookie_secure),
        *([Middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts)] if settings.allowed_hosts else []),
        *(
            [Middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)]
            if settings.trusted_proxies
            else []
        ),
        Middleware(CorsMiddleware, allowed_origins=settings.allowed_origins),
        Middleware(CsrfMiddleware, allowed_origins=settings.allowed_origins),
        Middleware(BodyPolicyMiddleware, max_bytes=settings.max_body_bytes),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={ApiError: handle_api_error, ClientGone: handle_client_gone},
    )
    app.state.drain = drain  # the CLI's server starts it on SIGTERM
    return app


def run_events(settings: Settings, storage: Storage, metrics: Metrics) -> RunEvents | None:
    """The run-end webhook, if `BFF_EVENTS_URL` is set (with its secret: checked at start-up)."""
    if settings.events_url is None or settings.events_secret is None:
        return None
    delivery = DeliverySettings(
        url=settings.events_url,
        key=webhook_key(settings.events_secret.get_secret_value()),
        include_text=settings.events_include_text,
        timeout=settings.events_timeout_seconds,
        retry_seconds=settings.events_retry_seconds,
        max_attempts=settings.events_max_attempts,
        max_pending=settings.events_max_pending,
        max_pending_bytes=settings.events_max_pending_bytes,
    )
    return RunEvents(delivery, storage, metrics)
