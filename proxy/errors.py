"""Every error a client can be told, each once, and the one place an error becomes a response.

The catalogue mirrors CONTRACT B6 and C4, with the codes the README adds (the service restarting, its
storage or the identity provider out of reach, the upstream's circuit open): each code with its HTTP
status, the message a client gets unless the code raising it says something more precise, and whether
the answer says in `Retry-After` when to come back. Code names the entry it raises:
`raise UNAUTHENTICATED.error()`, `CSRF_FAILED.error("The X-CSRF: 1 header is required.")`,
`RATE_LIMITED.error(retry_after=12)`. An entry that carries `Retry-After` has no `error()` without it,
so a missing one is a type error, not an answer without it.

The route chooses the format. JSON: `{"error": {"code", "message"}}` (CONTRACT B6). A
`TextErrorsRoute` (the chat routes, because useChat shows an error response's body as it is) answers
with the message as a short `text/plain` body and the code in `X-Error-Code`. A middleware refuses
before the router has matched a route, so a refusal asks the router which route the request is for,
the match the router would make next, and answers in that route's format (only refusals pay for
it); a request for no route at all gets JSON.

A client that left is told nothing: `ClientGone` is not an `ApiError`, it ends the request without an
answer, and the access log writes the request as 499, as nginx does for a client that left.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

from proxy.context import request_context


class ApiError(Exception):
    """An error a client is told: a catalogue entry's status and code, this time's message, headers."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Entry:
    """A row of the catalogue."""

    status: int
    code: str
    message: str  # the default: a raiser that knows more says that instead
    retry_after: ClassVar[bool] = False

    def _error(self, message: str | None, headers: dict[str, str]) -> ApiError:
        return ApiError(self.status, self.code, self.message if message is None else message, headers=headers)


class ErrorCode(Entry):
    """An entry whose answers never say when to come back."""

    def error(self, message: str | None = None, *, headers: Mapping[str, str] | None = None) -> ApiError:
        return self._error(message, dict(headers or {}))


class RetryLaterCode(Entry):
    """An entry whose answers always say in `Retry-After` how many seconds to wait before asking again."""

    retry_after: ClassVar[bool] = True

    def error(
        self, message: str | None = None, *, retry_after: int | str, headers: Mapping[str, str] | None = None
    ) -> ApiError:
        return self._error(message, {"Retry-After": str(retry_after), **(headers or {})})


# CONTRACT B6
UNAUTHENTICATED = ErrorCode(401, "unauthenticated", "Sign in first.")
CSRF_FAILED = ErrorCode(403, "csrf_failed", "This request failed the CSRF and origin checks.")
UNKNOWN_WORKFLOW = ErrorCode(404, "unknown_workflow", "No workflow is configured under that name.")
INVALID_INPUT = ErrorCode(422, "invalid_input", "The request is not valid.")
BODY_TOO_LARGE = ErrorCode(413, "body_too_large", "The body is too large.")
RATE_LIMITED = RetryLaterCode(429, "rate_limited", "Too many requests; try again later.")
TOO_MANY_STREAMS = RetryLaterCode(429, "too_many_streams", "Too many answers are streaming; wait for one to finish.")
UPSTREAM_OUT_OF_CREDITS = ErrorCode(402, "upstream_out_of_credits", "The upstream account has no credits left.")
WORKFLOW_NOT_FOUND = ErrorCode(404, "workflow_not_found", "The upstream service does not know this workflow.")
UPSTREAM_AUTH_FAILED = ErrorCode(502, "upstream_auth_failed", "The upstream service refused our credentials.")
UPSTREAM_RATE_LIMITED = RetryLaterCode(503, "upstream_rate_limited", "The upstream service is busy; try again shortly.")
UPSTREAM_ERROR = ErrorCode(502, "upstream_error", "The upstream service failed.")
UPSTREAM_TIMEOUT = ErrorCode(504, "upstream_timeout", "The upstream service did not answer in time.")
# CONTRACT C4
BUDGET_EXHAUSTED = RetryLaterCode(
    429, "budget_exhausted", "Today's answer budget is used up; it renews at midnight UTC."
)
ANSWER_TOO_LARGE = ErrorCode(502, "answer_too_large", "The answer was too large to return.")
UNKNOWN_RUN = ErrorCode(404, "unknown_run", "No such answer, or it is no longer kept.")
INVALID_HOST = ErrorCode(400, "invalid_host", "This service does not answer for that host name.")
# OpenID Connect Back-Channel Logout 1.0, 2.8: a logout token that fails validation is a 400
INVALID_LOGOUT_TOKEN = ErrorCode(400, "invalid_request", "The logout token is not valid.")
# The README's additions
UPSTREAM_UNAVAILABLE = RetryLaterCode(
    503, "upstream_unavailable", "The upstream service is unavailable; try again shortly."
)
STORAGE_UNAVAILABLE = RetryLaterCode(
    503, "storage_unavailable", "The service cannot reach its storage. Try again shortly."
)
AUTH_UNAVAILABLE = RetryLaterCode(503, "auth_unavailable", "Sign-in cannot be verified right now. Try again shortly.")
SHUTTING_DOWN = RetryLaterCode(503, "shutting_down", "The service is restarting. Please try again.")

CATALOGUE: Mapping[str, ErrorCode | RetryLaterCode] = MappingProxyType(
    {
        entry.code: entry
        for entry in (
            UNAUTHENTICATED,
            CSRF_FAILED,
            UNKNOWN_WORKFLOW,
            INVALID_INPUT,
            BODY_TOO_LARGE,
            RATE_LIMITED,
            TOO_MANY_STREAMS,
            UPSTREAM_OUT_OF_CREDITS,
            WORKFLOW_NOT_FOUND,
            UPSTREAM_AUTH_FAILED,
            UPSTREAM_RATE_LIMITED,
            UPSTREAM_ERROR,
            UPSTREAM_TIMEOUT,
            BUDGET_EXHAUSTED,
            ANSWER_TOO_LARGE,
            UNKNOWN_RUN,
            INVALID_HOST,
            INVALID_LOGOUT_TOKEN,
            UPSTREAM_UNAVAILABLE,
            STORAGE_UNAVAILABLE,
            AUTH_UNAVAILABLE,
            SHUTTING_DOWN,
        )
    }
)


def rebuilt(code: str, message: str, headers: Mapping[str, str]) -> ApiError:
    """The error another process told a client (a run's log keeps it), with the status this catalogue
    gives its code; `KeyError` for a code that is not in it."""
    entry = CATALOGUE[code]
    return ApiError(entry.status, entry.code, message, headers=dict(headers))


class ClientGone(Exception):
    """The client left before its answer (while sending its body, or waiting for a whole answer).

    Not an `ApiError`: nobody is left to be told anything. The code that notices writes how the
    request ended into its context, and `handle_client_gone` sends nothing."""


class TextErrorsRoute(Route):
    """A route whose errors are the message as short text, the code in `X-Error-Code`: useChat shows an
    error response's body as it is (CONTRACT B6)."""


def errors_as_text(scope: Scope) -> bool:
    return isinstance(_route_for(scope), TextErrorsRoute)


def _route_for(scope: Scope) -> BaseRoute | None:
    """The route the request is for. Once matched, the one Starlette's router put in the scope; before
    that (a middleware's refusal), the one it will match: the first that matches path and method, else
    the first that matches the path (it answers 405)."""
    matched = scope.get("route")
    if isinstance(matched, BaseRoute):
        return matched
    router = getattr(scope.get("app"), "router", None)
    if not isinstance(router, Router):  # a middleware on its own, in a test
        return None
    partial = None
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def error_response(error: ApiError, *, text: bool = False) -> Response:
    headers = {"Cache-Control": "no-store", **error.headers}
    if text:  # the code goes in a header: the body is what useChat shows
        headers["X-Error-Code"] = error.code
        return Response(error.message, error.status, headers, media_type="text/plain; charset=utf-8")
    body = json.dumps({"error": {"code": error.code, "message": error.message}})
    return Response(body, error.status, headers, media_type="application/json")


async def send_error(error: ApiError, scope: Scope, send: Send) -> None:
    """Answer from pure-ASGI code (middleware, streaming responses) before any byte was sent. The
    request's summary line says why (a CSRF refusal is answered before any route matched)."""
    request_context().end = f"refused:{error.code}"
    response = error_response(error, text=errors_as_text(scope))
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, object]:  # pragma: no cover - a plain Response never reads
    return {"type": "http.disconnect"}


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    context = request_context()
    if context.end is None:  # the summary line says why, unless the code that refused already did
        context.end = f"refused:{exc.code}"
    return error_response(exc, text=errors_as_text(request.scope))


class NoAnswer(Response):
    """The response to a client that left: nothing is sent. uvicorn adds no 500 of its own for an app
    that returns without answering when the client has disconnected, as it would otherwise."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


async def handle_client_gone(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientGone)
    return NoAnswer()
