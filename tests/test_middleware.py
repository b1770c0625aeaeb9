"""The middleware that adds to every answer (request id, access log, metrics, security headers, CORS)
are independent plain ASGI wrappers: each works alone and in any order (proxy/middleware/), and what
the request did reaches the access log through the request context (proxy/context.py).

In-process: a tiny ASGI app answers a two-chunk body, and the middleware are called as ASGI callables.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.context import RequestContext, ServingRequest, request_context
from proxy.logging import PIPE_BUF, BatchingStreamHandler, JsonFormatter, _atomic_pieces
from proxy.metrics import Metrics, MetricsMiddleware
from proxy.middleware.access_log import AccessLogMiddleware
from proxy.middleware.cors import CorsMiddleware
from proxy.middleware.request_id import RequestIdMiddleware
from proxy.middleware.security_headers import SecurityHeadersMiddleware

ORIGIN = "https://app.example.test"
Wrap = Callable[[ASGIApp], ASGIApp]


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    scope["route"] = SimpleNamespace(path="/things/{id}")  # what Starlette's router puts there
    request_context().user_hash = "user-hash"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ab", "more_body": True})
    await send({"type": "http.response.body", "body": b"c"})


class Lines(logging.Handler):
    """The access log's lines as the process's JSON formatter writes them, at the moment they are written."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter([]))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    handler, logger = Lines(), logging.getLogger("proxy.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def call(app: ASGIApp, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/things/1",
        "scheme": "http",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, *bodies = sent
    response_headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return start["status"], response_headers, b"".join(body["body"] for body in bodies)


def the_five(metrics: Metrics) -> dict[str, Wrap]:
    return {
        "request_id": RequestIdMiddleware,
        "access_log": AccessLogMiddleware,
        "metrics": lambda app: MetricsMiddleware(app, metrics=metrics),
        "security_headers": lambda app: SecurityHeadersMiddleware(app, hsts=False),
        "cors": lambda app: CorsMiddleware(app, allowed_origins=[ORIGIN]),
    }


def counted(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "bff_requests_total", {"route": "/things/{id}", "method": "GET", "status": "200"}
    )


def test_in_any_order_every_middleware_does_its_part(access_lines: Lines) -> None:
    metrics = Metrics()
    orders = list(itertools.permutations(the_five(metrics)))
    for order in orders:
        app: ASGIApp = answer
        for name in reversed(order):  # the first named is the outermost
            app = the_five(metrics)[name](app)

        status, headers, body = call(app, {"Origin": ORIGIN, "X-Request-ID": "req-1"})

        assert (status, body) == (200, b"abc"), order
        assert headers["x-request-id"] == "req-1", order
        assert headers["x-frame-options"] == "DENY", order
        assert (headers["access-control-allow-origin"], headers["vary"]) == (ORIGIN, "Origin"), order
        line = access_lines.lines.pop()
        assert line["request_id"] == "req-1", order
        assert (line["route"], line["status"], line["bytes"], line["end"]) == ("/things/{id}", 200, 3, "complete")
        assert line["user_hash"] == "user-hash", order
    assert counted(metrics) == len(orders)


@pytest.mark.parametrize("name", ["request_id", "access_log", "metrics", "security_headers", "cors"])
def test_each_middleware_works_alone(access_lines: Lines, name: str) -> None:
    metrics = Metrics()

    status, headers, body = call(the_five(metrics)[name](answer), {"Origin": ORIGIN, "X-Request-ID": "req-2"})

    assert (status, body) == (200, b"abc")
    mine = {
        "request_id": headers.get("x-request-id") == "req-2",
        "access_log": [(line["status"], line["user_hash"]) for line in access_lines.lines] == [(200, "user-hash")],
        "metrics": counted(metrics) == 1,
        "security_headers": headers.get("x-content-type-options") == "nosniff",
        "cors": headers.get("access-control-allow-origin") == ORIGIN,
    }
    assert mine[name]


def test_the_request_id_is_on_the_access_line_whichever_is_outermost(access_lines: Lines) -> None:
    outside = RequestIdMiddleware(AccessLogMiddleware(answer))
    inside = AccessLogMiddleware(RequestIdMiddleware(answer))

    call(outside, {"X-Request-ID": "outer-id"})
    call(inside, {"X-Request-ID": "inner-id"})

    assert [line["request_id"] for line in access_lines.lines] == ["outer-id", "inner-id"]


def test_outside_a_request_the_context_is_a_throwaway() -> None:
    request_context().end = "written by nobody's request"

    assert request_context().end is None


def test_tasks_a_request_starts_write_into_its_context() -> None:
    async def request() -> RequestContext:
        with ServingRequest() as context:
            # A run is a task of its own that outlives the request; its upstream calls are still this request's.
            await asyncio.get_running_loop().create_task(upstream_call())
            return context

    async def upstream_call() -> None:
        request_context().upstream_answered(402)

    context = asyncio.run(request())

    assert (context.upstream_status, context.upstream_error) == (402, None)


def test_an_inner_middleware_joins_the_context_an_outer_one_made() -> None:
    async def nested() -> tuple[RequestContext, RequestContext]:
        with ServingRequest() as outer, ServingRequest() as inner:
            return outer, inner

    outer, inner = asyncio.run(nested())

    assert outer is inner


def test_log_lines_of_one_loop_iteration_go_out_in_one_write() -> None:
    class Stream:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    stream = Stream()
    handler = BatchingStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.batching")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before the loop")  # no loop: at once
        assert stream.writes == ["before the loop\n"]

        async def burst() -> list[str]:
            with ServingRequest():
                log.warning("one")
                log.warning("two")
            held = list(stream.writes)
            await asyncio.sleep(0)  # the iteration ends: the held lines go out
            with ServingRequest():
                log.warning("three")
            log.warning("outside a request")  # at once, after what was held
            return held

        assert asyncio.run(burst()) == ["before the loop\n"]
        assert stream.writes == ["before the loop\n", "one\ntwo\n", "three\noutside a request\n"]
    finally:
        log.removeHandler(handler)


def test_held_log_lines_go_out_in_writes_a_pipe_keeps_whole() -> None:
    # Workers share one stderr: a write of up to PIPE_BUF bytes is never interleaved with another's.
    lines = [f"line {n} " + "é" * (n * 37 % 700) for n in range(60)] + ["long " + "x" * 9000]
    pieces = _atomic_pieces(lines)
    assert "".join(pieces) == "".join(line + "\n" for line in lines)
    assert all(piece.endswith("\n") for piece in pieces)
    assert all(len(piece.encode()) <= PIPE_BUF for piece in pieces[:-1])
    assert pieces[-1] == "long " + "x" * 9000 + "\n"  # a longer line goes alone
    assert len(pieces) < len(lines)  # and the rest together, as far as they fit
