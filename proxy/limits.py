"""Per-user rate limits (CONTRACT B5, B8 `BFF_RATE_LIMITS`), in slowapi's limit syntax ("30/minute").

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
from collections.abc import Mapping

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.storage import StorageUnavailable

LIMIT_NAMES = frozenset({"mint", "relay", "login"})


class RateLimitConfigError(ValueError):
    pass


def parse_rate_limits(value: str) -> dict[str, list[RateLimitItem]]:
    """`"mint=30/minute;relay=20/minute,500/day;login=10/minute"` → limits by name."""
    parsed: dict[str, list[RateLimitItem]] = {}
    for entry in (part.strip() for part in value.split(";")):
        if not entry:
            continue
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or name not in LIMIT_NAMES:
            raise RateLimitConfigError(f"{entry!r}: expected one of {', '.join(sorted(LIMIT_NAMES))}=<limits>")
        parsed[name] = parse_limit(spec)
    return parsed


def parse_limit(spec: str) -> list[RateLimitItem]:
    try:
        items = parse_many(spec)
    except ValueError as exc:
        raise RateLimitConfigError(f"{spec!r} is not a limit like 30/minute: {exc}") from None
    if not items:
        raise RateLimitConfigError(f"{spec!r} names no limit")
    return items


class RateLimiter:
    def __init__(
        self, storage: LimitsStorage, limits_by_name: Mapping[str, list[RateLimitItem]], *, metrics: Metrics
    ) -> None:
        self._storage = storage
        self._strategy = MovingWindowRateLimiter(storage)
        self._limits = dict(limits_by_name)
        self._metrics = metrics

    def has(self, name: str) -> bool:
        return bool(self._limits.get(name))

    async def hit(self, name: str, key: str, *, items: list[RateLimitItem] | None = None) -> dict[str, str]:
        """Count one request against limit `name` for `key` (a user id or a client IP).

        Returns the X-RateLimit-* headers of the tightest limit; raises a 429 ApiError when any limit
        is spent (with Retry-After), and a 503 when the limit storage cannot be reached: limits fail
        closed, or an outage would let one user burn the account's credits.
        """
        headers: dict[str, str] = {}
        tightest = math.inf
        for item in items if items is not None else self._limits.get(name, []):
            try:
                allowed = await self._strategy.hit(item, "bff", name, key)
                stats = await self._strategy.get_window_stats(item, "bff", name, key)
            except StorageError as exc:
                raise StorageUnavailable() from exc
            reset_in = max(1, math.ceil(stats.reset_time - time.time()))
            if not allowed:
                self._metrics.rate_limited.labels(name).inc()
                raise ApiError(
                    429,
                    "rate_limited",
                    f"Too many requests; try again in {reset_in} seconds.",
                    headers={
                        "Retry-After": str(reset_in),
                        "X-RateLimit-Limit": str(item.amount),
                        "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
                    },
                )
            if stats.remaining < tightest:
                tightest = stats.remaining
                headers = {
                    "X-RateLimit-Limit": str(item.amount),
                    "X-RateLimit-Remaining": str(stats.remaining),
                    "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
                }
        return headers
