"""One error type for everything a client can be told, and the one place it becomes a response.

JSON routes answer `{"error": {"code", "message"}}` (CONTRACT B6). The chat route answers with a short
`text/plain` body instead, because useChat shows an error response's body verbatim.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from proxy.context import request_context

CHAT_PATH_PREFIX = "/api/chat/"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthenticated() -> ApiError:
    return ApiError(401, "unauthenticated", "Sign in first.")


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "The service is restarting. Please try again.", headers={"Retry-After": "5"})


def client_gone() -> ApiError:
    """The client left before its answer. Nobody reads this; 499 is what proxies (nginx) log for it."""
    return ApiError(499, "client_closed_request", "The client closed the request.")


def invalid_input(message: str) -> ApiError:
    return ApiError(422, "invalid_input", message)


def wants_text_errors(path: str) -> bool:
    return path.startswith(CHAT_PATH_PREFIX)


def error_response(error: ApiError, *, text: bool = False) -> Response:
    headers = {"Cache-Control": "no-store", **error.headers}
    if text:  # the code goes in a header: the body is what useChat shows
        headers["X-Error-Code"] = error.code
        return Response(error.message, error.status, headers, media_type="text/plain; charset=utf-8")
    body = json.dumps({"error": {"code": error.code, "message": error.message}})
    return Response(body, error.status, headers, media_type="application/json")


async def send_error(error: ApiError, path: str, send: Send) -> None:
    """Answer from pure-ASGI code (middleware, streaming responses) before any byte was sent. The
    request's summary line says why (a CSRF refusal is answered before any route matched)."""
    request_context().end = f"refused:{error.code}"
    response = error_response(error, text=wants_text_errors(path))
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, object]:  # pragma: no cover - a plain Response never reads
    return {"type": "http.disconnect"}


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, text=wants_text_errors(request.url.path))
