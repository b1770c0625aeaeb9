"""Tracing, on (proxy/tracing/__init__.py decides): the tracer provider and the spans of our own code.

One `TracerProvider` per app, never the global one, so several apps in one process (the tests) each
export their own spans; its exporters start in the lifespan and are flushed when it ends. What the
spans may carry is decided here, in one place: route templates, workflow aliases, run ids, sizes,
reasons and error codes; never a user id, a session, an input, an answer, a token or a key. The one
exception is opt-in: `BFF_TRACE_USER=hashed` adds `enduser.pseudo.id`, a keyed hash of the user id
that cannot be turned back into it without the session secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
import redis.asyncio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.middleware import Middleware

from proxy import __version__
from proxy.errors import ApiError
from proxy.tracing.middleware import ServerSpanMiddleware

if TYPE_CHECKING:
    from proxy.runs.ending import Ending
    from proxy.runs.run import RunRequest
    from proxy.settings import Settings
    from proxy.storage.runlog import RunMeta

T = TypeVar("T")

DEFAULT_SERVICE_NAME = "workflow-bff"
# gen_ai.provider.name: the upstream is no provider the conventions list, so it gets its own name.
PROVIDER = "ai_tutor"
# Hex characters of the pseudonymous user id: 64 bits tell millions of users apart, and stay short.
PSEUDO_ID_CHARS = 16
PSEUDO_ID_LABEL = b"workflow-bff trace user id"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# An attribute's value is cut at this length, unless OTEL_*ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise.
MAX_ATTRIBUTE_CHARS = 1024
ATTRIBUTE_LENGTH_VARIABLES = ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")
# A run keeps the W3C context of the request that started it, whatever propagators are configured.
TRACE_CONTEXT = TraceContextTextMapPropagator()


class Tracing:
    """The app's tracer, its trusted callers and the pseudonym key; built in `create_app`, exporting
    between `start()` and `shutdown()` (the lifespan)."""

    def __init__(
        self,
        provider: TracerProvider,
        exporters: Sequence[Callable[[], SpanExporter]],
        *,
        trusted: Sequence[Network] = (),
        user_key: bytes | None = None,
        excluded_urls: str = "",
    ) -> None:
        self.provider = provider
        self.excluded_urls = excluded_urls
        self.tracer: Tracer = provider.get_tracer("workflow-bff", __version__)
        self.trusted = tuple(trusted)
        self._exporters = exporters
        self._user_key = user_key

    @classmethod
    def build(cls, settings: Settings, exporters: Sequence[str], protocol: str, *, excluded_urls: str) -> Tracing:
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the default.
        resource = Resource.create({SERVICE_VERSION: __version__})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        user_key = None
        if settings.trace_user == "hashed" and settings.session_secrets:
            newest = settings.session_secrets[0].get_secret_value().encode()
            user_key = hmac.new(newest, PSEUDO_ID_LABEL, hashlib.sha256).digest()
        return cls(
            # The sampler (OTEL_TRACES_SAMPLER) and the span limits are read from the environment here;
            # an attribute's length has a default bound (a 60 KB User-Agent would be exported whole).
            TracerProvider(resource=resource, span_limits=_span_limits()),
            [_exporter(name, protocol) for name in exporters],
            trusted=[ipaddress.ip_network(entry, strict=False) for entry in settings.trace_trusted],
            user_key=user_key,
            excluded_urls=excluded_urls,
        )

    def start(self) -> None:
        """Start exporting: the exporters read their OTEL_EXPORTER_* and OTEL_BSP_* variables here."""
        for make in self._exporters:
            self.provider.add_span_processor(BatchSpanProcessor(make()))

    async def shutdown(self) -> None:
        """Export what is left and stop; blocking work, done off the event loop."""
        await anyio.to_thread.run_sync(self.provider.shutdown)

    def middleware(self) -> Middleware:
        """The server span of every request (proxy/tracing/middleware.py)."""
        return Middleware(ServerSpanMiddleware, tracing=self)

    def instrument_redis(self, client: redis.asyncio.Redis) -> None:
        """A client span for each command of this client (sessions, slots, budgets; with its arguments
        left out), within a request's trace only."""
        RedisInstrumentor.instrument_client(client, tracer_provider=_WithinTraces(self.provider))

    def trusts(self, client: Sequence[Any] | None) -> bool:
        """Whether a TCP peer (the ASGI scope's `client`) may hand us its trace context."""
        if not client or not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def pseudo_id(self, user_id: str) -> str | None:
        if self._user_key is None:
            return None
        return hmac.new(self._user_key, user_id.encode(), hashlib.sha256).hexdigest()[:PSEUDO_ID_CHARS]

    async def admission(self, pending: Awaitable[T]) -> T:
        """The admission checks (budget, slot, rate limit) as one span, with the refusal's code (a
        refusal is the checks working, not a failed span)."""
        return await _spanned(self.tracer, "bff.admission", pending, failed=False)

    def run(self, request: RunRequest, meta: RunMeta) -> RunTrace:
        operation = "chat" if request.what.startswith("chat") else "invoke_workflow"
        attributes: dict[str, str] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.system": PROVIDER,  # the older name of the same, which some backends still read
            "gen_ai.request.model": meta.alias,
            "gen_ai.response.id": meta.run_id,
            "bff.relay": request.what,
        }
        if (pseudo_id := self.pseudo_id(meta.user_id)) is not None:
            attributes["enduser.pseudo.id"] = pseudo_id
        return RunTrace(self.tracer, f"{operation} {meta.alias}", attributes, streamed=request.streamed)

    def traceparent(self) -> str | None:
        """The current span's context as a W3C `traceparent`, to keep with a run."""
        carrier: dict[str, str] = {}
        TRACE_CONTEXT.inject(carrier)
        return carrier.get("traceparent")

    def link_to_run(self, traceparent: str) -> None:
        """This request follows a run started on another replica: its span links to the trace of the
        request that started it (`traceparent`, kept with the run), where the answer's span is."""
        started = trace.get_current_span(TRACE_CONTEXT.extract({"traceparent": traceparent})).get_span_context()
        here = trace.get_current_span()
        if started.is_valid and here.get_span_context().trace_id != started.trace_id:
            here.add_link(started, {"bff.link": "run"})

    @contextmanager
    def upstream_call(self, method: str, template: str, server: tuple[str, int]) -> Iterator[UpstreamCall]:
        """An HTTP client span for one upstream request, whose context goes to the upstream in the
        request's `traceparent`. The URL is described by its template: the stream URL holds a token."""
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.template": template,
            "server.address": server[0],
            "server.port": server[1],
        }
        with self.tracer.start_as_current_span(
            f"{method} {template}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,  # aiohttp's errors may quote the stream URL, token and all
            set_status_on_exception=False,
        ) as span:
            call = UpstreamCall(span)
            # The W3C context only: baggage a caller handed us (user ids, often) is not the upstream's.
            TRACE_CONTEXT.inject(call.headers)
            try:
                yield call
            except ApiError as error:
                call.failed(error.code)
                raise


class UpstreamCall:
    """The span of one upstream request, and the headers that carry its context."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.headers: dict[str, str] = {}

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.failed(str(status))

    def failed(self, kind: str) -> None:
        self.span.set_attribute("error.type", kind)
        self.span.set_status(Status(StatusCode.ERROR))


class RunTrace:
    """The spans of one run: the mint, and the upstream answer (a GenAI client span, from the stream
    request to the run's end, with the times of the upstream's headers and first chunk as events).

    Created with the run, in the request's context: spans started by the run's task are children of
    the request's server span, whichever request follows the run later."""

    def __init__(self, tracer: Tracer, name: str, attributes: dict[str, str], *, streamed: bool) -> None:
        self._tracer = tracer
        self._name = name
        self._attributes = attributes
        self._streamed = streamed
        self._started_ns = time.time_ns()
        self._span: Span | None = None

    async def mint(self, pending: Awaitable[T]) -> T:
        """A stream token, from the pool or minted (then its upstream request is a child span)."""
        return await _spanned(self._tracer, "bff.mint", pending, failed=True)

    async def upstream(self, pending: Awaitable[T]) -> T:
        """Ask the upstream (the stream request, or `/run`): the answer's span starts here, and ends
        with the run."""
        span = self._span = self._tracer.start_span(self._name, kind=SpanKind.CLIENT, attributes=self._attributes)
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            answer = await pending
        if self._streamed:
            span.add_event("upstream.headers")
        return answer

    def first_chunk(self) -> None:
        if self._span is not None:
            self._span.add_event("upstream.first_chunk")

    def stopped(self, reason: str) -> None:
        if self._span is not None:
            self._span.add_event("bff.run.stop", {"bff.run.stop_reason": reason})

    def followed(self) -> None:
        """A follower attached. One from another request (a resume, another tab) is an event on the
        answer's span, and its own request's span links to the answer's."""
        if self._span is None:
            return
        here = trace.get_current_span()
        context = self._span.get_span_context()
        if here.get_span_context().trace_id != context.trace_id:
            here.add_link(context, {"bff.link": "run"})
            self._span.add_event("bff.run.resume")

    def end(self, ending: Ending, chars: int) -> None:
        span = self._span
        if span is None:  # ended before the upstream was asked: the span says how, from the run's start
            span = self._tracer.start_span(
                self._name, kind=SpanKind.CLIENT, attributes=self._attributes, start_time=self._started_ns
            )
        span.set_attribute("bff.run.end", ending.reason)
        span.set_attribute("bff.output.chars", chars)
        if ending.error is not None and not ending.nobody_left:
            span.set_attribute("error.type", ending.error.code)
            if ending.error.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()


async def _spanned(tracer: Tracer, name: str, pending: Awaitable[T], *, failed: bool) -> T:
    """Await `pending` in a span of its own; an ApiError puts its code in `error.type`, and with
    `failed` marks the span as an error."""
    with tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False) as span:
        try:
            return await pending
        except ApiError as error:
            span.set_attribute("error.type", error.code)
            if failed:
                span.set_status(Status(StatusCode.ERROR))
            raise


class _WithinTraces(trace.TracerProvider):
    """Tracers that start a span only within a trace under way: the commands of background tasks
    (the lease renewals every few seconds, the budget's settling) would each start a trace of their own."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return _WithinTrace(self._provider.get_tracer(*args, **kwargs))


class _WithinTrace(trace.Tracer):
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Context | None = None, *args: Any, **kwargs: Any) -> Span:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)

    # contextlib's decorator, where the API uses a private one that does the same.
    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: Context | None = None, *args: Any, **kwargs: Any
    ) -> Iterator[Span]:
        if not trace.get_current_span(context).get_span_context().is_valid:
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, context, *args, **kwargs) as span:
            yield span


def _span_limits() -> SpanLimits:
    named = any(os.environ.get(name) for name in ATTRIBUTE_LENGTH_VARIABLES)
    return SpanLimits() if named else SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_CHARS)


def _exporter(name: str, protocol: str) -> Callable[[], SpanExporter]:
    if name == "console":
        return ConsoleSpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter
