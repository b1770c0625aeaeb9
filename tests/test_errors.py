"""The error catalogue (proxy/errors.py): every code the service can answer, once, with its status and
whether it says when to come back; the format the route chooses; and a client that left, told nothing.
In-process: the apps here are called as ASGI callables."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import limits.errors
import pytest
import redis.exceptions
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from proxy import errors
from proxy.context import request_context
from proxy.errors import (
    BUDGET_EXHAUSTED,
    CATALOGUE,
    INVALID_INPUT,
    RATE_LIMITED,
    UPSTREAM_TIMEOUT,
    ApiError,
    ClientGone,
    Entry,
    TextErrorsRoute,
    error_response,
    handle_api_error,
    handle_client_gone,
    rebuilt,
)
from proxy.middleware.access_log import AccessLogMiddleware
from proxy.middleware.csrf import CsrfMiddleware
from proxy.runs.ending import Ending
from proxy.storage import StorageUnavailable, reachable
from tests.servers import ROOT

# CONTRACT B6 and C4: code -> status.
CONTRACT = {
    "unauthenticated": 401,
    "csrf_failed": 403,
    "unknown_workflow": 404,
    "invalid_input": 422,
    "body_too_large": 413,
    "rate_limited": 429,
    "too_many_streams": 429,
    "upstream_out_of_credits": 402,
    "workflow_not_found": 404,
    "upstream_auth_failed": 502,
    "upstream_rate_limited": 503,
    "upstream_error": 502,
    "upstream_timeout": 504,
    "budget_exhausted": 429,
    "answer_too_large": 502,
    "unknown_run": 404,
    "invalid_host": 400,
}
# Every answer that asks the client to come back later says when.
RETRY_AFTER = {
    "rate_limited",
    "too_many_streams",
    "upstream_rate_limited",
    "budget_exhausted",
    "upstream_unavailable",
    "storage_unavailable",
    "auth_unavailable",
    "shutting_down",
}


# The catalogue


def test_every_contract_code_is_in_the_catalogue_with_its_status() -> None:
    assert {code: CATALOGUE[code].status for code in CONTRACT} == CONTRACT


def test_the_answers_that_ask_to_come_back_later_say_when_and_no_other_does() -> None:
    assert {code for code, entry in CATALOGUE.items() if entry.retry_after} == RETRY_AFTER
    assert RATE_LIMITED.error(retry_after=12).headers == {"Retry-After": "12"}
    assert INVALID_INPUT.error("Bad.").headers == {}


def test_each_entry_is_listed_once_under_its_own_code() -> None:
    entries = [value for value in vars(errors).values() if isinstance(value, Entry)]

    assert sorted(entry.code for entry in entries) == sorted(CATALOGUE)
    assert all(CATALOGUE[code].code == code for code in CATALOGUE)


def test_an_error_has_the_entrys_message_unless_the_raiser_says_more() -> None:
    default = UPSTREAM_TIMEOUT.error()
    precise = UPSTREAM_TIMEOUT.error("The answer took too long and was stopped.")

    assert (default.status, default.code, default.message) == (504, "upstream_timeout", UPSTREAM_TIMEOUT.message)
    assert (precise.status, precise.code, precise.message) == (504, "upstream_timeout", precise.message)


def test_more_headers_go_beside_retry_after() -> None:
    error = RATE_LIMITED.error(retry_after="3", headers={"X-RateLimit-Remaining": "0"})

    assert error.headers == {"Retry-After": "3", "X-RateLimit-Remaining": "0"}


def test_the_readme_error_table_is_the_catalogue() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Errors") :].split("\n\n")[2]
    rows = [line.split("|")[2:4] for line in table.splitlines()[2:]]
    documented = {code.strip(" `"): (int(status.split()[0]), "Retry-After" in status) for status, code in rows}

    assert documented == {code: (entry.status, entry.retry_after) for code, entry in CATALOGUE.items()}


def test_only_the_catalogue_makes_errors() -> None:
    """`grep ApiError(` finds errors.py alone: every other module names an entry."""
    sources = [path for path in (ROOT / "proxy").rglob("*.py") if path != ROOT / "proxy" / "errors.py"]
    literal = re.compile(r"\bApiError\(")

    assert [str(path.relative_to(ROOT)) for path in sources if literal.search(_code(path))] == []


def _code(path: Path) -> str:
    """The module without its docstrings and comments' prose about `ApiError(...)`."""
    return re.sub(r'"""[\s\S]*?"""|#.*', "", path.read_text())


@pytest.mark.parametrize(
    "failure",
    [redis.exceptions.ConnectionError("down"), limits.errors.StorageError(ConnectionError("down"))],
    ids=["ours", "the-rate-limits"],
)
def test_a_storage_out_of_reach_is_503_whichever_client_met_it(failure: Exception) -> None:
    with pytest.raises(StorageUnavailable) as raised, reachable():
        raise failure

    error = raised.value
    assert (error.status, error.code, error.headers) == (503, "storage_unavailable", {"Retry-After": "5"})


# A run's ending, told on another replica


def test_a_refusal_read_back_from_a_run_log_has_the_catalogues_status() -> None:
    refused = Ending.refused(BUDGET_EXHAUSTED.error(retry_after=60))

    again = Ending.from_entry(refused.entry()[1])

    assert again.error is not None
    assert (again.reason, again.error.status, again.error.code) == ("refused:budget_exhausted", 429, "budget_exhausted")
    assert again.error.headers == {"Retry-After": "60"}


def test_a_code_this_version_does_not_know_reads_back_as_a_lost_run() -> None:
    entry = json.dumps({"reason": "refused:new_code", "status": 418, "code": "new_code", "message": "?"})

    assert Ending.from_entry(entry.encode()).reason == "lost"
    with pytest.raises(KeyError):
        rebuilt("new_code", "?", {})


@pytest.mark.parametrize(
    "reason", ["client_gone", "client_gone_early", "revoked", "shutdown", "deadline", "upstream_cut", "too_large"]
)
def test_every_way_a_run_fails_tells_a_code_of_the_catalogue(reason: str) -> None:
    error = Ending.of(reason).error

    assert error is not None and CATALOGUE[error.code].status == error.status


# The route chooses the format


async def _refuse(request: Request) -> Response:
    raise INVALID_INPUT.error("Not like this.")


async def _leave(request: Request) -> Response:
    request_context().end = "client_gone_early"  # as the body reader says when the client left mid-upload
    raise ClientGone


def app() -> ASGIApp:
    return Starlette(
        routes=[
            TextErrorsRoute("/api/chat/{alias}", _refuse, methods=["POST"]),
            Route("/api/things", _refuse, methods=["POST"]),
            Route("/api/gone", _leave, methods=["POST"]),
        ],
        middleware=[Middleware(AccessLogMiddleware), Middleware(CsrfMiddleware, allowed_origins=[])],
        exception_handlers={ApiError: handle_api_error, ClientGone: handle_client_gone},
    )


def call(path: str, method: str = "POST", *, csrf: bool = True) -> list[Message]:
    headers = [(b"host", b"bff.test")] + ([(b"x-csrf", b"1")] if csrf else [])
    scope = {"type": "http", "method": method, "path": path, "scheme": "http", "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app()(scope, receive, send))  # type: ignore[arg-type]
    return sent


def answer(sent: list[Message]) -> tuple[int, dict[str, str], str]:
    start, *body = sent
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    return start["status"], headers, b"".join(message.get("body", b"") for message in body).decode()


def test_a_route_declared_for_text_answers_its_errors_as_text_with_the_code_in_a_header() -> None:
    status, headers, body = answer(call("/api/chat/tutor"))

    assert (status, body) == (422, "Not like this.")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-error-code"] == "invalid_input"


def test_other_routes_answer_json() -> None:
    status, headers, body = answer(call("/api/things"))

    assert (status, json.loads(body)) == (422, {"error": {"code": "invalid_input", "message": "Not like this."}})
    assert headers["content-type"] == "application/json"
    assert "x-error-code" not in headers


@pytest.mark.parametrize(
    ("path", "method", "text"),
    [
        ("/api/chat/tutor", "POST", True),
        ("/api/chat/tutor", "PUT", True),  # the route's path, not its method: still the route's format
        ("/api/things", "POST", False),
        ("/api/chat/tutor/no/such/route", "POST", False),
    ],
)
def test_a_refusal_before_routing_takes_the_format_of_the_route_the_request_is_for(
    path: str, method: str, text: bool
) -> None:
    status, headers, body = answer(call(path, method, csrf=False))

    assert status == 403
    if text:
        assert (headers["content-type"], headers["x-error-code"]) == ("text/plain; charset=utf-8", "csrf_failed")
        assert body == "The X-CSRF: 1 header is required."
    else:
        assert (headers["content-type"], "x-error-code" in headers) == ("application/json", False)
        assert json.loads(body)["error"]["code"] == "csrf_failed"


def test_every_error_answer_is_not_stored() -> None:
    for text in (False, True):
        assert error_response(INVALID_INPUT.error("x"), text=text).headers["cache-control"] == "no-store"


def test_a_client_that_left_is_answered_nothing_and_logged_as_499(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="proxy.access"):
        sent = call("/api/gone")

    assert sent == []
    [line] = [record for record in caplog.records if record.getMessage() == "request end"]
    assert (line.status, line.end) == (499, "client_gone_early")  # type: ignore[attr-defined]


@pytest.mark.parametrize("reason", ["client_gone", "client_gone_early"])
def test_resuming_an_answer_that_stopped_because_nobody_followed_it_finds_nothing_to_replay(reason: str) -> None:
    ending = Ending.of(reason)

    # Only a resume by id hears the error (the request that started the run had left): the upstream
    # did not fail, so it is no upstream_error.
    assert ending.error is not None
    assert (ending.error.status, ending.error.code) == (404, "unknown_run")
    assert ending.inband == "The answer was interrupted. Please try again."
