"""The one door to the upstream AI Tutor workflow API (CONTRACT Part A): what the rest of the proxy
may ask of it.

Routes, runs and the token pool are written against `Upstream`, not against an HTTP library. Its one
implementation is `HttpUpstream` (client.py: URLs, the API key, timeouts, mint retries), over one
aiohttp session per process, created in the lifespan; what an upstream failure becomes is in
errors.py, when to stop calling a failing upstream in breaker.py, and how an open answer is read in
body.py. Unit tests give runs an in-process fake (tests/fake_upstream.py).

Why aiohttp directly behind this interface, rather than httpx's API over an aiohttp transport: httpx
kept honestly (public API only: `build_request`, no private cookie jar, answers read through
`aiter_raw`) costs more than the shortcuts it would replace, and aiohttp alone costs less. Measured
with `python -m bench --targets bff,bare-aiohttp --streams 200` (one repeat a run, the designs run in
turn on a shared 2-core machine): medians, and the ratio to bare aiohttp in the same run with its
range:

                              before                  httpx, honestly         aiohttp (this)
    CPU per relayed request   1,272 us  3.71x         1,508 us  4.14x         1,055 us  2.82x
                              (3.24-4.18, 7 runs)     (3.61-4.83, 4 runs)     (2.72-3.45, 5 runs)
    CPU per relayed chunk     64.1 us  1.57x          66.2 us  1.74x          65.0 us  1.47x
                              (1.41-1.86)             (1.45-1.95)             (1.26-1.73)

The chunk figures overlap within the machine's noise. The door alone shows the same order (a mint
and a stream request, read and closed, in one process against the bench upstream, three runs each;
before, httpx, aiohttp): 448-473, 630-646 and 257-271 us per request; 8.7-10.0, 9.4-10.9 and 7.4-8.7
us per chunk. One private name of aiohttp is used, in body.py: `StreamReader._read_nowait`, to hand over the bytes
that arrived just before a connection broke (aiohttp raises the error first, and its public
`read_nowait` raises it too); tests/test_relay.py's and test_faults.py's cut tests fail without it.
One HTTP library now serves the upstream; httpx is left for the JWKS fetch of jwt
sign-in (proxy/auth/jwt.py).
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
