"""Per-user rate limits (CONTRACT B5, B8 `BFF_RATE_LIMITS`), in slowapi's limit syntax ("30/minute",
parsed by proxy/limits.py).

Why not slowapi's own request path: its checks are synchronous (`Limiter._check_request_limit` calls
`limits`' sync `hit` and `get_window_stats` inline), so with Redis every check blocks the event loop
and stalls every open stream; its pure-ASGI middleware breaks streaming responses; and it cannot
charge after a stream ends. `bench/limiter_stall.py` measures the stall. So the checks here are the
same `limits` strategies slowapi uses, through `limits.aio` and its async storage, with slowapi's
header conventions (`X-RateLimit-Limit`, `-Remaining`, `-Reset`, `Retry-After`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from limits import RateLimitItem
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.util import WindowStats

from proxy.errors import RATE_LIMITED, ApiError
from proxy.metrics import Metrics
from proxy.storage import reachable

# The first identifier of every limit's key in the limits storage (`RateLimitItem.key_for`).
NAMESPACE = "bff"


@dataclass(frozen=True)
class Window:
    """What is left of one limit for one user, for `GET /api/usage`."""

    name: str  # mint or relay
    workflow: str | None  # a workflow's own limit (its `rate_limit`), or None for the limit of `name`
    limit: str  # as GET /auth/session shows it: "20 per 1 minute"
    remaining: int
    resets_at: float  # Unix time: when the window has room again, as X-RateLimit-Reset says


class RateLimiter:
    def __init__(
        self,
        storage: LimitsStorage,
        limits_by_name: Mapping[str, list[RateLimitItem]],
        *,
        per_workflow: Mapping[str, list[RateLimitItem]] | None = None,
        metrics: Metrics,
    ) -> None:
        self._strategy = MovingWindowRateLimiter(storage)
        self._limits = dict(limits_by_name)
        self._per_workflow = dict(per_workflow or {})
        self._metrics = metrics

    def describe(self) -> dict[str, str]:
        """The configured limits, as the user wrote them (for GET /auth/session)."""
        return {name: ", ".join(str(item) for item in items) for name, items in sorted(self._limits.items())}

    def checks(self, name: str, workflow: str | None = None) -> list[tuple[str, RateLimitItem]]:
        """The limits a request counts against, in order, each with its scope: those of `name`, then
        the workflow's own."""
        checks = [(name, item) for item in self._limits.get(name, [])]
        if workflow is not None:
            checks += [(f"{name}:{workflow}", item) for item in self._per_workflow.get(workflow, [])]
        return checks

    async def check(self, name: str, key: str, *, workflow: str | None = None) -> dict[str, str]:
        """Count one request against limit `name` (and the workflow's own limit) for `key`, a user id
        or, before sign-in, a client IP.

        Returns the X-RateLimit-* headers of the tightest limit. Raises a 429 ApiError with Retry-After
        when a limit is spent, and 503 when the limit storage cannot be reached: limits fail closed, or
        an outage would let one user burn the account's credits.
        """
        checks = self.checks(name, workflow)
        with reachable():
            # Test every limit before counting against any: a request refused by one limit must not
            # use up the others. A single limit needs no test: its hit counts only when it allows.
            # (proxy/storage/admission_redis.py does the same in one Lua script.)
            for scope, item in checks if len(checks) > 1 else []:
                if not await self._strategy.test(item, NAMESPACE, scope, key):
                    raise await self._refusal(name, scope, item, key)
            counted = []
            for scope, item in checks:
                if not await self._strategy.hit(item, NAMESPACE, scope, key):  # lost a race with another request
                    raise await self._refusal(name, scope, item, key)
                counted.append((item, await self._strategy.get_window_stats(item, NAMESPACE, scope, key)))
        return self.headers(counted)

    async def windows(self, names: Sequence[str], key: str) -> list[Window]:
        """What is left of each limit of `names` for `key`, and of each workflow's own relay limit,
        read without counting anything against them."""
        found = []
        with reachable():
            for name in names:
                scopes: list[tuple[str, str | None, RateLimitItem]] = [
                    (name, None, item) for item in self._limits.get(name, [])
                ]
                if name == "relay":
                    for alias, items in sorted(self._per_workflow.items()):
                        scopes += [(f"{name}:{alias}", alias, item) for item in items]
                for scope, workflow, item in scopes:
                    stats = await self._strategy.get_window_stats(item, NAMESPACE, scope, key)
                    found.append(Window(name, workflow, str(item), max(0, stats.remaining), stats.reset_time))
        return found

    async def _refusal(self, name: str, scope: str, item: RateLimitItem, key: str) -> ApiError:
        return self.refusal(name, item, await self._strategy.get_window_stats(item, NAMESPACE, scope, key))

    def refusal(self, name: str, item: RateLimitItem, stats: WindowStats) -> ApiError:
        """The 429 of a request that `item` (one of limit `name`'s) refused, its window now `stats`."""
        self._metrics.rate_limited.labels(name).inc()
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        message = f"Too many requests; try again in {retry_after} seconds."
        return RATE_LIMITED.error(message, retry_after=retry_after, headers=self._headers(item, stats))

    @classmethod
    def headers(cls, counted: Sequence[tuple[RateLimitItem, WindowStats]]) -> dict[str, str]:
        """The X-RateLimit-* headers of the tightest of the limits a request was counted against (the
        first of equals), each with its window after the count."""
        headers: dict[str, str] = {}
        tightest = math.inf
        for item, stats in counted:
            if stats.remaining < tightest:
                tightest, headers = stats.remaining, cls._headers(item, stats)
        return headers

    @staticmethod
    def _headers(item: RateLimitItem, stats: WindowStats) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(item.amount),
            "X-RateLimit-Remaining": str(stats.remaining),
            "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
        }
