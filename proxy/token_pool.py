"""Stream tokens for relays and mints, optionally pre-minted (`BFF_TOKEN_POOL`, CONTRACT B8).

Every relay needs a fresh single-use token, which costs a round trip to the upstream before the stream
request can even be sent. Unused tokens cost nothing, so with `BFF_TOKEN_POOL=N` each process keeps up
to N fresh tokens ready and refills in the background. The rules:
- a pooled token goes to exactly one caller, and is never reused;
- it is never handed out with less than `SAFETY_MARGIN` of its TTL left (older ones are dropped);
- the pool is sized from recent demand (tokens taken in the last `DEMAND_WINDOW` seconds, at most N),
  so an idle process mints nothing;
- the refill respects the upstream's rate limit (the upstream client pauses mints after a 429) and
  backs off after any failure;
- on shutdown the refill stops and the pool is dropped (unused tokens simply expire).
With N = 0 (the default) every caller mints its own token, exactly as before.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import anyio

from proxy.errors import ApiError
from proxy.upstream import MintedToken, Upstream

logger = logging.getLogger("proxy.token_pool")

DEMAND_WINDOW = 60.0
REFILL_BACKOFF_SECONDS = 1.0


class TokenSource:
    def __init__(self, upstream: Upstream, ttl: int, pool_size: int) -> None:
        self._upstream = upstream
        self._ttl = ttl
        self.pool_size = pool_size
        # Never hand out a token that could expire before the stream request reaches the upstream.
        self.safety_margin = max(2.0, ttl / 4)
        self._pool: deque[MintedToken] = deque()
        self._taken: deque[float] = deque()
        self._wanted = anyio.Event()

    def __len__(self) -> int:
        return len(self._pool)

    async def take(self, *, request_id: str | None = None) -> MintedToken:
        """A fresh token for one caller: from the pool when one is ready, else minted now."""
        if self.pool_size:  # demand only sizes a pool; without one, recording it would only grow
            self._taken.append(time.monotonic())
            self._wanted.set()
        while self._pool:
            token = self._pool.popleft()
            if token.expires_at - time.time() >= self.safety_margin:
                return token
        return await self._upstream.mint_token(self._ttl, request_id=request_id)

    def target(self) -> int:
        """How many tokens to keep ready: recent demand, capped at the pool size."""
        cutoff = time.monotonic() - DEMAND_WINDOW
        while self._taken and self._taken[0] < cutoff:
            self._taken.popleft()
        return min(self.pool_size, len(self._taken))

    async def refill_forever(self) -> None:
        """The background task (only when the pool is on): keep `target()` fresh tokens ready."""
        while True:
            self._drop_stale()
            if len(self._pool) >= self.target():
                self._wanted = anyio.Event()
                # Wake on demand, or in time to replace the oldest token before it goes stale.
                with anyio.move_on_after(self._next_check()):
                    await self._wanted.wait()
                continue
            try:
                self._pool.append(await self._upstream.mint_token(self._ttl))
            except ApiError as error:
                wait = float(error.headers.get("Retry-After", REFILL_BACKOFF_SECONDS))
                logger.warning("token pool refill failed: %s; retrying in %.0f s", error.code, wait)
                await anyio.sleep(wait)
            except Exception:
                # Whatever it was, it must not end this task: it shares the lifespan's task group,
                # whose failure would close the HTTP client and storage under a server still serving.
                logger.exception("token pool refill failed; retrying in %.0f s", REFILL_BACKOFF_SECONDS)
                await anyio.sleep(REFILL_BACKOFF_SECONDS)

    def close(self) -> None:
        self._pool.clear()

    def _drop_stale(self) -> None:
        now = time.time()
        while self._pool and self._pool[0].expires_at - now < self.safety_margin:
            self._pool.popleft()

    def _next_check(self) -> float:
        if not self._pool:
            return DEMAND_WINDOW
        return max(0.1, self._pool[0].expires_at - time.time() - self.safety_margin)
