"""The one door to the upstream AI Tutor workflow API (CONTRACT Part A): what the rest of the proxy
may ask of it.

Routes, runs and the token pool are written against `Upstream`, not against an HTTP library. Its one
implementation is `HttpUpstream` (client.py: URLs, the API key, timeouts, mint retries), over one pool
of keep-alive connections per process (http1.py), created in the lifespan; what an upstream failure
becomes is in errors.py, when to stop calling a failing upstream in breaker.py, and how an open answer
is read in body.py. Unit tests give runs an in-process fake (tests/fake_upstream.py).

The HTTP client under it went httpx, then aiohttp (issue 7: httpx's API over an aiohttp transport cost
more than aiohttp alone), then http1.py (issue 20): a pool of asyncio protocols with httptools' parser,
writing each request in one go and reading answers chunk by chunk. Alternating runs of bench/ab.py (3
rounds of 3000 relays, aiohttp against http1.py, everything else the same): CPU per relayed request
901 -> 660 us at concurrency 10, 714 -> 585 us at concurrency 200; idle time to first byte 1.9 -> 1.8
ms. aiohttp still delivers run events (proxy/events/), off the relay's path; httpx fetches jwt
sign-in's JWKS (proxy/auth/jwt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MintedToken:
    token: str
    ttl: int
    expires_at: float  # time.time() by which the upstream stops accepting it


@dataclass(frozen=True)
class RunResult:
    result: str
    citations: list[str]


class UpstreamCut(Exception):
    """The upstream's answer broke off after it had started (its connection lost, its framing broken)."""


class UpstreamBody(Protocol):
    """An open answer, read chunk by chunk. The reader closes it, finished or not."""

    async def read_chunk(self) -> bytes:
        """The bytes that arrived since the last call, as soon as there are any; b"" at the end.
        Raises `UpstreamCut` when the answer broke off."""
        ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """The upstream workflow API. Every failure to answer is an `ApiError` with the CONTRACT B6 status
    and code; its messages are ours and generic, never the upstream's text, and never hold the key."""

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        """GET /api/v1/token with the API key: a single-use stream token, valid for `ttl` seconds."""
        ...

    def stream_url(self, workflow_id: str, token: str) -> str:
        """Where a browser streams the workflow with a minted token (token-mediating mode)."""
        ...

    async def open_stream(
        self, workflow_id: str, token: str, inputs: dict[str, str], *, request_id: str | None = None
    ) -> UpstreamBody:
        """POST the stream request; the open answer once the upstream answered 200. Never retried: the
        request spends the single-use token."""
        ...

    async def run(
        self, workflow_id: str, inputs: dict[str, str], *, max_bytes: int, request_id: str | None = None
    ) -> RunResult:
        """POST /api/v1/run/{id}: the whole answer, if it is no larger than `max_bytes`."""
        ...

    async def aclose(self) -> None:
        """At shutdown: close the connections."""
        ...
