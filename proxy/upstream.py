"""The one door to the upstream AI Tutor workflow API (CONTRACT Part A).

Everything that builds an upstream URL, sends the API key, retries a mint or reads an upstream error
lives here. Upstream failures become `ApiError`s with the CONTRACT B6 status and code; their messages
are ours and generic, never the upstream's text, and never contain the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from proxy.errors import ApiError

logger = logging.getLogger("proxy.upstream")

MINT_ATTEMPTS = 3
MINT_BACKOFF_SECONDS = 0.2
MINT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
ERROR_BODY_LIMIT = 4096
DEFAULT_RETRY_AFTER = "5"


def build_http_client(max_stream_seconds: float) -> httpx.AsyncClient:
    """The process-wide client, created in the lifespan.

    httpx's defaults are wrong for LLM streams: `read` is the gap between chunks and a model can think
    for minutes before its first token, and a pool of 100 with a 5 s pool timeout turns the 101st
    concurrent stream into an error. The stream's total duration is bounded by the relay's deadline.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=max_stream_seconds, write=10.0, pool=10.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=30.0),
        # Identity encoding: the relay forwards raw bytes and must not forward a compressed body.
        headers={"Accept-Encoding": "identity", "User-Agent": "workflow-bff"},
        follow_redirects=False,
        trust_env=False,
    )


@dataclass(frozen=True)
class MintedToken:
    token: str
    ttl: int
    expires_at: float


@dataclass(frozen=True)
class RunResult:
    result: str
    citations: list[str]


class UpstreamClient:
    def __init__(self, http: httpx.AsyncClient, base_url: str, api_key: SecretStr) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    def _run_url(self, workflow_id: str) -> str:
        return f"{self._base_url}/api/v1/run/{quote(workflow_id, safe='')}"

    def stream_url(self, workflow_id: str, token: str) -> str:
        return f"{self._run_url(workflow_id)}/stream?token={quote(token, safe='')}"

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        """GET /api/v1/token. Retried on connect errors and 5xx: an unused token costs nothing."""
        headers = {**self._auth(), **_request_id_header(request_id)}
        for attempt in range(1, MINT_ATTEMPTS + 1):
            try:
                response = await self._http.get(
                    f"{self._base_url}/api/v1/token",
                    params={"ttl": ttl},
                    headers=headers,
                    timeout=MINT_TIMEOUT,
                )
            except httpx.TransportError as exc:
                if attempt == MINT_ATTEMPTS:
                    raise _transport_error(exc, "mint") from None
                await _backoff(attempt)
                continue
            if response.status_code >= 500 and attempt < MINT_ATTEMPTS:
                logger.warning("upstream mint answered %s; retrying", response.status_code)
                await _backoff(attempt)
                continue
            if response.status_code != 200:
                raise _status_error(response.status_code, response.headers, response.content, "mint")
            body = _json_object(response.content)
            token = body.get("token")
            granted = body.get("ttl", ttl)
            if not isinstance(token, str) or not token or not isinstance(granted, int):
                raise ApiError(502, "upstream_error", "The upstream service sent an unexpected answer.")
            return MintedToken(token=token, ttl=granted, expires_at=time.time() + granted)
        raise AssertionError("unreachable")  # pragma: no cover

    async def open_stream(
        self, workflow_id: str, token: str, inputs: dict[str, str], *, request_id: str | None = None
    ) -> httpx.Response:
        """POST the stream request and return the open response once the upstream answered 200.

        The caller owns the response and must `aclose()` it. Nothing here retries: a stream request
        spends the single-use token, and once bytes flowed a retry would duplicate output.
        """
        request = self._http.build_request(
            "POST",
            f"{self._run_url(workflow_id)}/stream",
            params={"token": token},
            json=inputs,
            headers=_request_id_header(request_id),
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _transport_error(exc, "stream") from None
        if response.status_code != 200:
            try:
                body = await _read_limited(response)
            finally:
                await response.aclose()
            raise _status_error(response.status_code, response.headers, body, "stream")
        return response

    async def run(self, workflow_id: str, inputs: dict[str, str], *, request_id: str | None = None) -> RunResult:
        """POST /api/v1/run/{id}: the whole answer at once."""
        try:
            response = await self._http.post(
                self._run_url(workflow_id),
                json=inputs,
                headers={**self._auth(), **_request_id_header(request_id)},
            )
        except httpx.TransportError as exc:
            raise _transport_error(exc, "run") from None
        if response.status_code != 200:
            raise _status_error(response.status_code, response.headers, response.content, "run")
        body = _json_object(response.content)
        result = body.get("result")
        citations = body.get("citations") or []
        if not isinstance(result, str) or not isinstance(citations, list):
            raise ApiError(502, "upstream_error", "The upstream service sent an unexpected answer.")
        return RunResult(result=result, citations=[str(c) for c in citations])


def _request_id_header(request_id: str | None) -> dict[str, str]:
    return {"X-Request-ID": request_id} if request_id else {}


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(MINT_BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


async def _read_limited(response: httpx.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    return body[:ERROR_BODY_LIMIT]


def _json_object(content: bytes) -> dict[str, object]:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(502, "upstream_error", "The upstream service sent an unexpected answer.")
    return body


def upstream_error_detail(content: bytes) -> str:
    """The upstream's own error text, for the server log only. Both CONTRACT A4 shapes, or raw text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', '')}: {error.get('message', '')}"[:200]
    return str(error)[:200]


def _status_error(status: int, headers: httpx.Headers, content: bytes, operation: str) -> ApiError:
    logger.warning("upstream %s answered %s: %s", operation, status, upstream_error_detail(content))
    if status == 401 and operation == "stream":
        return ApiError(502, "upstream_error", "The upstream service refused the stream token.")
    if status in (401, 403):
        return ApiError(502, "upstream_auth_failed", "The upstream service refused our credentials.")
    if status == 402:
        return ApiError(402, "upstream_out_of_credits", "The upstream account has no credits left.")
    if status == 404:
        return ApiError(404, "workflow_not_found", "The upstream service does not know this workflow.")
    if status == 429:
        retry_after = headers.get("retry-after", DEFAULT_RETRY_AFTER)
        if not retry_after.isdigit():
            retry_after = DEFAULT_RETRY_AFTER
        return ApiError(
            503,
            "upstream_rate_limited",
            "The upstream service is busy; try again shortly.",
            headers={"Retry-After": retry_after},
        )
    return ApiError(502, "upstream_error", "The upstream service failed.")


def _transport_error(exc: httpx.TransportError, operation: str) -> ApiError:
    logger.warning("upstream %s failed: %s", operation, type(exc).__name__)
    if isinstance(exc, httpx.PoolTimeout):
        return ApiError(
            503,
            "upstream_busy",
            "Too many requests are waiting for the upstream service.",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, "upstream_timeout", "The upstream service did not answer in time.")
    return ApiError(502, "upstream_error", "The upstream service could not be reached.")
