"""A server span per request, by OpenTelemetry's ASGI middleware (only added when tracing is on).

Three things are ours: the span is named by the route template (`POST /api/chat/{alias}`), never
by the raw path with its ids; the query string is left out (the OIDC callback's carries the
authorization code); and a caller's trace context (`traceparent` and whatever else the configured
propagators read) is continued only from a TCP peer in `BFF_TRACE_TRUSTED` (not BFF_TRUSTED_PROXIES:
a balancer believed for the client's address passes a browser's headers on). From anyone else it is
ignored and the request starts a new trace, so an outsider can neither join our traces nor pick their
ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.propagate import get_global_textmap
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.context import ServingRequest

if TYPE_CHECKING:
    from proxy.tracing.spans import Tracing

# Span attributes that hold the request's full URL or its query.
URL_ATTRIBUTES = ("http.url", "url.full")
QUERY_ATTRIBUTES = ("url.query",)


class ServerSpanMiddleware:
    def __init__(self, app: ASGIApp, *, tracing: Tracing) -> None:
        self.tracing = tracing
        self.traced = OpenTelemetryMiddleware(
            _NamedByRoute(app),
            excluded_urls=tracing.excluded_urls,
            tracer=tracing.tracer,
            # Prometheus has the request metrics (proxy/metrics.py): none from here.
            meter_provider=NoOpMeterProvider(),
            default_span_details=_method_only,
            server_request_hook=_without_query,
            # A span per ASGI message would cost more than the request it describes.
            exclude_spans=["receive", "send"],
        )
        self.propagated = {name.lower().encode("latin-1") for name in get_global_textmap().fields}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A WebSocket handshake is traced too (and refused later): its headers are checked the same way.
        if scope["type"] in ("http", "websocket") and not self.tracing.trusts(scope.get("client")):
            headers = [(name, value) for name, value in scope["headers"] if name not in self.propagated]
            if len(headers) != len(scope["headers"]):
                scope = {**scope, "headers": headers}
        await self.traced(scope, receive, send)


class _NamedByRoute:
    """Renames the server span once the router has matched: `{method} {route template}`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = trace.get_current_span()
        if scope["type"] != "http" or not span.is_recording():
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The router has put the matched route into the scope by the time the response starts.
                template = getattr(scope.get("route"), "path", None)
                if template is not None:
                    span.update_name(f"{scope['method']} {template}")
                    span.set_attribute("http.route", template)
            await send(message)

        # The request's context starts here (the middleware inside share it), with the trace id the
        # access log writes, so a log line leads to its trace.
        with ServingRequest() as context:
            context.trace_id = format(span.get_span_context().trace_id, "032x")
            await self.app(scope, receive, send_named)


def _method_only(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The name until the route is known (and for a request no route matched): the method."""
    return str(scope.get("method") or "HTTP"), {}


def _without_query(span: Span, scope: dict[str, Any]) -> None:
    if not scope.get("query_string") or not isinstance(span, ReadableSpan):
        return
    attributes = span.attributes or {}
    for key in URL_ATTRIBUTES:
        if isinstance(value := attributes.get(key), str):
            span.set_attribute(key, value.partition("?")[0])
    for key in QUERY_ATTRIBUTES:
        if key in attributes:
            span.set_attribute(key, "REDACTED")
