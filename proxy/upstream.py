"""The one door to the upstream AI Tutor workflow API (CONTRACT Part A).

Everything that builds an upstream URL, sends the API key, retries a mint or reads an upstream error
lives here. Upstream failures become `ApiError`s with the CONTRACT B6 status and code; their messages
are ours and generic, never the upstream's text, and never contain the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from proxy.body import loads_text
from proxy.context import request_context
from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.transport import AiohttpTransport, open_body

logger = logging.getLogger("proxy.upstream")

MINT_ATTEMPTS = 3
MINT_BACKOFF_SECONDS = 0.2
MINT_TIMEOUT = httpx.Timeout(10.0, connect=5.0).as_dict()
ERROR_BODY_LIMIT = 4096
MINT_ANSWER_LIMIT = 65536
DEFAULT_RETRY_AFTER = "5"
RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,9}")
MAX_RETRY_AFTER_SECONDS = 3600
POOL_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_SECONDS = 10.0
GATEWAY_FAILURES = frozenset({502, 503, 504})


def build_http_client(max_stream_seconds: float) -> httpx.AsyncClient:
    """The process-wide client, created in the lifespan.

    httpx's defaults are wrong for LLM streams: `read` is the gap between chunks and a model can think
    for minutes before its first token, and a pool of 100 with a 5 s pool timeout turns the 101st
    concurrent stream into an error. The stream's total duration is bounded by the relay's deadline.
    The transport is aiohttp's pool under httpx's API (proxy/transport.py): measured side by side,
    2,042 us of CPU per streamed request with httpx's own transport, 993 with httpx2, 498 with this.
    """
    client = httpx.AsyncClient(
        transport=AiohttpTransport(max_connections=POOL_CONNECTIONS, keepalive_expiry=KEEPALIVE_SECONDS),
        timeout=httpx.Timeout(connect=5.0, read=max_stream_seconds, write=10.0, pool=10.0),
        # Identity encoding: the relay forwards raw bytes and must not forward a compressed body.
        headers={"Accept-Encoding": "identity", "User-Agent": "workflow-bff"},
        follow_redirects=False,
        trust_env=False,
    )
    # One client serves every user: a cookie the upstream sets must never go out again, to anyone.
    # httpx has no public way to turn its cookie jar off, and parsing every response's headers for
    # cookies only to refuse them profiled at ~8% of the relay's CPU.
    client._cookies = _NoCookies()
    return client


class _NoCookies(httpx.Cookies):
    """A cookie store that never stores anything."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


@dataclass(frozen=True)
class MintedToken:
    token: str
    ttl: int
    expires_at: float


@dataclass(frozen=True)
class RunResult:
    result: str
    citations: list[str]


class CircuitBreaker:
    """Stops hammering an upstream that is down.

    After `threshold` consecutive failures (connection errors, timeouts, 502-504) every call fails at once
    with a 503 for `cooldown` seconds, instead of piling up connections that hang. Then a single probe
    call is let through: success closes the circuit, failure opens it for another cooldown.
    """

    def __init__(self, threshold: int = BREAKER_THRESHOLD, cooldown: float = BREAKER_COOLDOWN_SECONDS) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap one upstream call, which reports `success()` or `failure()`."""
        if self._opened_at is not None:
            remaining = self._opened_at + self.cooldown - time.monotonic()
            if remaining > 0 or self._probing:
                raise ApiError(
                    503,
                    "upstream_unavailable",
                    "The upstream service is unavailable; try again shortly.",
                    headers={"Retry-After": str(max(1, math.ceil(remaining)))},
                )
            self._probing = True
        try:
            yield
        finally:
            # A probe that was cancelled decided nothing: the next call may probe again.
            self._probing = False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.threshold:
            if self._opened_at is None:
                logger.warning("upstream circuit opened after %s consecutive failures", self._failures)
            self._opened_at = time.monotonic()


class UpstreamClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: SecretStr,
        *,
        metrics: Metrics | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        # What `AsyncClient.build_request` would merge into every request, merged once.
        self._headers = dict(http.headers)
        self._timeout = http.timeout.as_dict()
        # A stream's duration and its silences are bounded by the relay's deadline. A read timeout
        # as well would only re-arm a timer on every chunk (aiohttp's `_reschedule_timeout`).
        self._stream_timeout = {**self._timeout, "read": None}
        # Mint URLs by TTL (whole seconds up to BFF_TOKEN_TTL): httpx takes ~25 us to parse one.
        self._mint_urls: dict[int, httpx.URL] = {}
        self._metrics = metrics or Metrics()
        self.breaker = breaker or CircuitBreaker()
        # After an upstream 429 on minting, mints wait out its Retry-After here instead of adding load.
        self._mint_paused_until = 0.0

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    def _request(
        self,
        method: str,
        url: httpx.URL | str,
        headers: dict[str, str],
        *,
        body: dict[str, str] | None = None,
        timeout: dict[str, float | None] | None = None,
    ) -> httpx.Request:
        """The request `AsyncClient.build_request` would build, without re-parsing and merging URLs
        and parameters, which cost ~130 us per request: ours are whole already."""
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            headers = {**headers, "Content-Type": "application/json"}
        return httpx.Request(
            method,
            url,
            headers={**self._headers, **headers},
            content=content,
            extensions={"timeout": self._timeout if timeout is None else timeout},
        )

    def _run_url(self, workflow_id: str) -> str:
        return f"{self._base_url}/api/v1/run/{quote(workflow_id, safe='')}"

    def stream_url(self, workflow_id: str, token: str) -> str:
        return f"{self._run_url(workflow_id)}/stream?token={quote(token, safe='')}"

    async def _send(
        self, request: httpx.Request, operation: str, *, read: int | None = None
    ) -> tuple[httpx.Response, bytes]:
        """One upstream call, through the circuit breaker; transport failures become ApiErrors.

        With `read`, the answer is read (at most that many bytes, an error's at most 4 KB: never a
        body whole, whatever its size) and closed; without, it is returned open, to be streamed."""
        with self.breaker.guard():
            try:
                response = await self._http.send(request, stream=True)
                content = b""
                if read is not None:
                    try:
                        content = await _read_limited(
                            response, read if response.status_code == 200 else ERROR_BODY_LIMIT
                        )
                    finally:
                        await response.aclose()
            except httpx.TransportError as exc:
                self.breaker.failure()
                kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connect"
                self._metrics.upstream_errors.labels(kind).inc()
                request_context().upstream_answered(None, kind)
                raise _transport_error(exc, operation) from None
            except httpx.HTTPError as exc:  # an answer httpx cannot read, e.g. a body that is not the gzip it claims
                self._metrics.upstream_errors.labels("unreadable").inc()
                request_context().upstream_answered(None, "unreadable")
                logger.warning("upstream %s answer unreadable: %s", operation, type(exc).__name__)
                raise ApiError(502, "upstream_error", "The upstream service sent an unreadable answer.") from None
            status = response.status_code
            # The last upstream call of a request is the one its summary line reports.
            request_context().upstream_answered(status)
            if status >= 400:
                self._metrics.upstream_errors.labels("5xx" if status >= 500 else "4xx").inc()
            # Only signs of an upstream that is down count; a 500 from one broken workflow must not
            # shut every workflow off.
            if status in GATEWAY_FAILURES:
                self.breaker.failure()
            else:
                self.breaker.success()
            return response, content

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        """GET /api/v1/token. Retried on connect errors and 5xx: an unused token costs nothing."""
        paused = self._mint_paused_until - time.monotonic()
        if paused > 0:
            self._metrics.mints.labels("paused").inc()
            raise _rate_limited(str(math.ceil(paused)))
        url = self._mint_urls.get(ttl)
        if url is None:
            url = self._mint_urls[ttl] = httpx.URL(f"{self._base_url}/api/v1/token?ttl={int(ttl)}")
        request = self._request(
            "GET",
            url,
            {**self._auth(), **_request_id_header(request_id)},
            timeout=MINT_TIMEOUT,
        )
        for attempt in range(1, MINT_ATTEMPTS + 1):
            retry = attempt < MINT_ATTEMPTS
            # The TTL runs from when the upstream minted, which is after this: never later than it.
            asked_at = time.time()
            try:
                response, content = await self._send(request, "mint", read=MINT_ANSWER_LIMIT)
            except ApiError as error:
                if not retry or error.code == "upstream_unavailable":
                    self._metrics.mints.labels("failed").inc()
                    raise
                await _backoff(attempt)
                continue
            if response.status_code >= 500 and retry and not self.breaker.is_open:
                logger.warning("upstream mint answered %s; retrying", response.status_code)
                await _backoff(attempt)
                continue
            break
        if response.status_code != 200:
            self._metrics.mints.labels("failed").inc()
            refusal = _status_error(response.status_code, response.headers, content, "mint")
            if response.status_code == 429:
                self._mint_paused_until = time.monotonic() + int(refusal.headers["Retry-After"])
            raise refusal
        body = _json_object(content)
        token = body.get("token")
        granted = body.get("ttl", ttl)
        if not isinstance(token, str) or not token or not isinstance(granted, int):
            raise ApiError(502, "upstream_error", "The upstream service sent an unexpected answer.")
        self._metrics.mints.labels("ok").inc()
        return MintedToken(token=token, ttl=granted, expires_at=asked_at + granted)

    async def open_stream(
        self, workflow_id: str, token: str, inputs: dict[str, str], *, request_id: str | None = None
    ) -> httpx.Response:
        """POST the stream request and return the open response once the upstream answered 200.

        The caller owns the response and must `aclose()` it. Nothing here retries: a stream request
        spends the single-use token, and once bytes flowed a retry would duplicate output.
        """
        request = self._request(
            "POST",
            self.stream_url(workflow_id, token),
            _request_id_header(request_id),
            body=inputs,
            timeout=self._stream_timeout,
        )
        response, _ = await self._send(request, "stream")
        if response.status_code != 200:
            try:
                body = await _read_limited(response)
            finally:
                await response.aclose()
            raise _status_error(response.status_code, response.headers, body, "stream")
        return response

    async def run(
        self, workflow_id: str, inputs: dict[str, str], *, max_bytes: int, request_id: str | None = None
    ) -> RunResult:
        """POST /api/v1/run/{id}: the whole answer at once, if it is no larger than `max_bytes`.

        Read as a stream with a cap, never whole: an upstream that answers with megabytes would
        otherwise cost this process that much memory before anything could look at it."""
        request = self._request(
            "POST", self._run_url(workflow_id), {**self._auth(), **_request_id_header(request_id)}, body=inputs
        )
        response, content = await self._send(request, "run", read=max_bytes + 1)
        if response.status_code != 200:
            raise _status_error(response.status_code, response.headers, content, "run")
        if len(content) > max_bytes:
            logger.warning("upstream run answer larger than %s bytes; refused", max_bytes)
            raise ApiError(502, "answer_too_large", "The answer was too large to return.")
        body = _json_object(content)
        result = body.get("result")
        citations = body.get("citations") or []
        if not isinstance(result, str) or not isinstance(citations, list):
            raise ApiError(502, "upstream_error", "The upstream service sent an unexpected answer.")
        return RunResult(result=result, citations=[str(c) for c in citations])


def _request_id_header(request_id: str | None) -> dict[str, str]:
    return {"X-Request-ID": request_id} if request_id else {}


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(MINT_BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


async def _read_limited(response: httpx.Response, limit: int = ERROR_BODY_LIMIT) -> bytes:
    """At most `limit` bytes of a streamed body (what is beyond is not read)."""
    body = open_body(response)
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await body.read_chunk()):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]


def _json_object(content: bytes) -> dict[str, object]:
    try:
        body = loads_text(content)
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
        # Seconds only (an HTTP date gets the default), ASCII digits, and capped: the value is ours to
        # parse and to pass on, and a mint pause must not outlive any sensible rate-limit window.
        retry_after = headers.get("retry-after", "")
        if RETRY_AFTER_SECONDS.fullmatch(retry_after):
            return _rate_limited(str(min(int(retry_after), MAX_RETRY_AFTER_SECONDS)))
        return _rate_limited(DEFAULT_RETRY_AFTER)
    return ApiError(502, "upstream_error", "The upstream service failed.")


def _rate_limited(retry_after: str) -> ApiError:
    message = "The upstream service is busy; try again shortly."
    return ApiError(503, "upstream_rate_limited", message, headers={"Retry-After": retry_after})


def _transport_error(exc: httpx.TransportError, operation: str) -> ApiError:
    logger.warning("upstream %s failed: %s", operation, type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, "upstream_timeout", "The upstream service did not answer in time.")
    return ApiError(502, "upstream_error", "The upstream service could not be reached.")
