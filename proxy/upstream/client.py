"""`HttpUpstream`, the one implementation of `Upstream`: every call to the upstream workflow API.

Everything that builds an upstream URL, sends the API key, sets a timeout or retries a mint lives
here, over one pool of keep-alive connections per process (http1.py, created in the lifespan). What a
failure becomes is in errors.py; when to stop calling, in breaker.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from pydantic import SecretStr

from proxy.context import request_context
from proxy.errors import ANSWER_TOO_LARGE, UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, ApiError
from proxy.json_text import loads_text
from proxy.metrics import Metrics, call_outcome
from proxy.upstream import MintedToken, RunResult, UpstreamBody, UpstreamCut
from proxy.upstream.body import StreamedBody, let_go
from proxy.upstream.breaker import CircuitBreaker
from proxy.upstream.errors import (
    TRANSPORT_ERRORS,
    UNEXPECTED,
    UpstreamTimeout,
    rate_limited,
    status_error,
    transport_error,
    transport_failure,
    transport_words,
)
from proxy.upstream.http1 import Answer, Http1Pool

if TYPE_CHECKING:
    from proxy.tracing.spans import Tracing

logger = logging.getLogger("proxy.upstream")

MINT_ATTEMPTS = 3
MINT_BACKOFF_SECONDS = 0.2
ERROR_BODY_LIMIT = 4096
MINT_ANSWER_LIMIT = 65536
POOL_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 30.0
CONNECT_SECONDS = 5.0  # the TCP (and TLS) connect
POOL_WAIT_SECONDS = 10.0  # a connection from the pool, connecting included
MINT_READ_SECONDS = 10.0
GATEWAY_FAILURES = frozenset({502, 503, 504})
# Each call's URL as a template (OpenTelemetry's url.template): the stream URL itself holds a token.
TEMPLATES = {
    "mint": "/api/v1/token",
    "stream": "/api/v1/run/{workflow_id}/stream",
    "run": "/api/v1/run/{workflow_id}",
}
# Identity encoding: the relay forwards raw bytes and must not forward a compressed body.
HEADERS = {"Accept-Encoding": "identity", "User-Agent": "workflow-bff"}
# What may not be in a header value: it would end the header and start another (request splitting).
HEADER_BREAKS = re.compile(r"[\r\n\0]")


class HttpUpstream:
    """The upstream over HTTP. Create it inside the running event loop (the lifespan), and `aclose()`
    it at shutdown. Read timeouts are the longest silence while an answer is read (None: no bound
    here, the run's deadline bounds it)."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        max_stream_seconds: float,
        metrics: Metrics | None = None,
        breaker: CircuitBreaker | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._tracing = tracing
        parts = urlsplit(self._base_url)
        tls = parts.scheme == "https"
        self._server = (parts.hostname or "", parts.port or (443 if tls else 80))
        self._path = parts.path  # a base URL may have a path the API's paths go under
        host = self._server[0] if ":" not in self._server[0] else f"[{self._server[0]}]"
        # The request's fixed lines. One client serves every user: no cookie the upstream sets is kept,
        # nor ever sent (this client has no cookie jar).
        fixed = {"Host": host if parts.port is None else f"{host}:{parts.port}", **HEADERS}
        self._fixed_head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self._api_key = api_key
        self._pool = Http1Pool(
            *self._server,
            tls=tls,
            limit=POOL_CONNECTIONS,
            keepalive_seconds=KEEPALIVE_SECONDS,
            connect_seconds=CONNECT_SECONDS,
            pool_wait_seconds=POOL_WAIT_SECONDS,
        )
        # A model can think for minutes before its first token: a `/run` answer may be silent as long
        # as a stream may last. A stream's duration and its silences are bounded by the run's deadline.
        self._run_timeout = max_stream_seconds
        self._mint_timeout = MINT_READ_SECONDS
        self._stream_timeout = None
        self._metrics = metrics or Metrics()
        self.breaker = breaker or CircuitBreaker()
        # After an upstream 429 on minting, mints wait out its Retry-After here instead of adding load.
        self._mint_paused_until = 0.0

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key.get_secret_value()}"}

    @staticmethod
    def _run_target(workflow_id: str) -> str:
        return f"/api/v1/run/{quote(workflow_id, safe='')}"

    @staticmethod
    def _stream_target(workflow_id: str, token: str) -> str:
        return f"/api/v1/run/{quote(workflow_id, safe='')}/stream?token={quote(token, safe='')}"

    def stream_url(self, workflow_id: str, token: str) -> str:
        return self._base_url + self._stream_target(workflow_id, token)

    async def _send(
        self,
        method: str,
        target: str,
        operation: str,
        headers: dict[str, str],
        read_timeout: float | None,
        *,
        body: dict[str, str] | None = None,
        read: int | None = None,
    ) -> tuple[Answer, bytes]:
        """One upstream call, through the circuit breaker; transport failures become ApiErrors.

        With `read`, the answer is read (at most that many bytes, an error's at most 4 KB: never a
        body whole, whatever its size) and closed; without, it is returned open, to be streamed.
        With tracing on, the call is a client span, and its context goes along in `traceparent`."""
        if self._tracing is None:
            return await self._call(self._request(method, target, headers, body), operation, read_timeout, read)
        with self._tracing.upstream_call(method, TEMPLATES[operation], self._server) as call:
            request = self._request(method, target, {**headers, **call.headers}, body)
            response, answer = await self._call(request, operation, read_timeout, read)
            call.answered(response.status)
            return response, answer

    async def _call(
        self, request: bytes, operation: str, read_timeout: float | None, read: int | None
    ) -> tuple[Answer, bytes]:
        if (refusal := self.breaker.refusal()) is not None:
            self._metrics.upstream_errors.labels("circuit_open").inc()
            raise refusal
        started = time.monotonic()
        with self.breaker.guard():
            try:
                response = await self._pool.request(request, read_timeout)
                headers_seconds = time.monotonic() - started
                answer = b""
                if read is not None:
                    try:
                        answer = await _read_limited(response, read if response.status == 200 else ERROR_BODY_LIMIT)
                    finally:
                        let_go(response)
            except TRANSPORT_ERRORS as exc:
                self.breaker.failure()
                failure = transport_failure(exc)
                kind = "timeout" if isinstance(failure, UpstreamTimeout) else "connect"
                self._metrics.upstream_errors.labels(kind).inc()
                self._metrics.upstream_headers.labels(operation, kind).observe(time.monotonic() - started)
                request_context().upstream_answered(None, kind)
                # Chained to our failure, whose words have no token in them; never to the original,
                # which may hold the stream URL (`from None` would also hide the words `check` shows).
                raise transport_error(failure, operation) from failure
            status = response.status
            # The last upstream call of a request is the one its summary line reports.
            request_context().upstream_answered(status)
            outcome = call_outcome(status)
            self._metrics.upstream_headers.labels(operation, outcome).observe(headers_seconds)
            if status >= 400:
                self._metrics.upstream_errors.labels(outcome).inc()
            # Only signs of an upstream that is down count; a 500 from one broken workflow must not
            # shut every workflow off.
            if status in GATEWAY_FAILURES:
                self.breaker.failure()
            else:
                self.breaker.success()
            return response, answer

    def _request(self, method: str, target: str, headers: dict[str, str], body: dict[str, str] | None) -> bytes:
        """The whole request, head and body, as it goes on the wire."""
        lines = [f"{method} {self._path}{target} HTTP/1.1\r\n", self._fixed_head]
        for name, value in headers.items():
            if HEADER_BREAKS.search(value):
                raise ValueError(f"header {name}: line breaks are not allowed")
            lines.append(f"{name}: {value}\r\n")
        content = b""
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            lines.append(f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1") + content

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        """GET /api/v1/token. Retried on connect errors and 5xx: an unused token costs nothing."""
        paused = self._mint_paused_until - time.monotonic()
        if paused > 0:
            self._metrics.mints.labels("paused").inc()
            raise rate_limited(str(math.ceil(paused)))
        target = f"/api/v1/token?ttl={int(ttl)}"
        headers = {**self._auth(), **_request_id_header(request_id)}
        started = time.monotonic()
        for attempt in range(1, MINT_ATTEMPTS + 1):
            retry = attempt < MINT_ATTEMPTS
            # The TTL runs from when the upstream minted, which is after this: never later than it.
            asked_at = time.time()
            try:
                response, content = await self._send(
                    "GET", target, "mint", headers, self._mint_timeout, read=MINT_ANSWER_LIMIT
                )
            except ApiError as error:
                if not retry or error.code == UPSTREAM_UNAVAILABLE.code:
                    self._minted("failed", started)
                    raise
                await _backoff(attempt)
                continue
            if response.status >= 500 and retry and not self.breaker.is_open:
                logger.warning("upstream mint answered %s; retrying", response.status)
                await _backoff(attempt)
                continue
            break
        if response.status != 200:
            self._minted("failed", started)
            refusal = status_error(response.status, response.headers, content, "mint")
            if response.status == 429:
                self._mint_paused_until = time.monotonic() + int(refusal.headers["Retry-After"])
            raise refusal
        try:
            token, granted = _token_answer(content, ttl)
        except ApiError:
            self._minted("failed", started)
            raise
        self._minted("ok", started)
        return MintedToken(token=token, ttl=granted, expires_at=asked_at + granted)

    def _minted(self, outcome: str, started: float) -> None:
        self._metrics.mints.labels(outcome).inc()
        self._metrics.upstream_mint.labels(outcome).observe(time.monotonic() - started)

    async def open_stream(
        self, workflow_id: str, token: str, inputs: dict[str, str], *, request_id: str | None = None
    ) -> UpstreamBody:
        """POST the stream request and return the open answer once the upstream answered 200.

        The caller owns the answer and must `aclose()` it. Nothing here retries: a stream request
        spends the single-use token, and once bytes flowed a retry would duplicate output.
        """
        response, _ = await self._send(
            "POST",
            self._stream_target(workflow_id, token),
            "stream",
            _request_id_header(request_id),
            self._stream_timeout,
            body=inputs,
        )
        if response.status != 200:
            try:
                content = await _read_limited(response, ERROR_BODY_LIMIT)
            except TRANSPORT_ERRORS as exc:
                raise UpstreamCut(transport_words(exc)) from None
            finally:
                let_go(response)
            raise status_error(response.status, response.headers, content, "stream")
        return StreamedBody(response)

    async def run(
        self, workflow_id: str, inputs: dict[str, str], *, max_bytes: int, request_id: str | None = None
    ) -> RunResult:
        """POST /api/v1/run/{id}: the whole answer at once, if it is no larger than `max_bytes`.

        Read as a stream with a cap, never whole: an upstream that answers with megabytes would
        otherwise cost this process that much memory before anything could look at it."""
        started = time.monotonic()
        response, content = await self._send(
            "POST",
            self._run_target(workflow_id),
            "run",
            {**self._auth(), **_request_id_header(request_id)},
            self._run_timeout,
            body=inputs,
            read=max_bytes + 1,
        )
        if response.status != 200:
            raise status_error(response.status, response.headers, content, "run")
        self._metrics.upstream_first_chunk.labels("run", "ok").observe(time.monotonic() - started)
        if len(content) > max_bytes:
            logger.warning("upstream run answer larger than %s bytes; refused", max_bytes)
            raise ANSWER_TOO_LARGE.error()
        answer = _json_object(content)
        result = answer.get("result")
        citations = answer.get("citations") or []
        if not isinstance(result, str) or not isinstance(citations, list):
            raise UPSTREAM_ERROR.error(UNEXPECTED)
        return RunResult(result=result, citations=[str(c) for c in citations])


def _request_id_header(request_id: str | None) -> dict[str, str]:
    return {"X-Request-ID": request_id} if request_id else {}


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(MINT_BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


async def _read_limited(response: Answer, limit: int) -> bytes:
    """At most `limit` bytes of the answer (what is beyond is not read)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await response.read_chunk()):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]


def _token_answer(content: bytes, ttl: int) -> tuple[str, int]:
    """The token and its TTL from a mint's answer (CONTRACT A1)."""
    answer = _json_object(content)
    token = answer.get("token")
    granted = answer.get("ttl", ttl)
    if not isinstance(token, str) or not token or not isinstance(granted, int):
        raise UPSTREAM_ERROR.error(UNEXPECTED)
    return token, granted


def _json_object(content: bytes) -> dict[str, object]:
    try:
        answer = loads_text(content)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise UPSTREAM_ERROR.error(UNEXPECTED)
    return answer
