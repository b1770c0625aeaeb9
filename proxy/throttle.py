"""Login throttling: failed sign-ins counted per client IP and per username, then 429.

Only failures count, so a user who types the password right is never slowed down by their own
sign-ins. The counters live behind one small interface (`FailureCounter`); `WindowFailureCounter`
keeps them in the shared limits storage, so a guesser gains nothing by spreading over replicas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from limits import RateLimitItemPerSecond
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from starlette.requests import HTTPConnection

from proxy.errors import ApiError
from proxy.storage import StorageUnavailable


class FailureCounter(Protocol):
    async def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when it may try now."""

    async def record_failure(self, key: str) -> None: ...

    async def clear(self, key: str) -> None: ...


class WindowFailureCounter:
    """At most `limit` failures per key in a moving window of `window` seconds, counted in the shared
    limits storage (BFF_STORAGE_URL), so every replica sees the same count."""

    def __init__(self, storage: LimitsStorage, name: str, limit: int, window: int) -> None:
        self._strategy = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerSecond(limit, window)
        self._name = name

    async def retry_after(self, key: str) -> float:
        with _reachable():
            stats = await self._strategy.get_window_stats(self._item, "login-failures", self._name, key)
        return 0.0 if stats.remaining > 0 else max(stats.reset_time - time.time(), 0.0)

    async def record_failure(self, key: str) -> None:
        with _reachable():
            await self._strategy.hit(self._item, "login-failures", self._name, key)

    async def clear(self, key: str) -> None:
        with _reachable():
            await self._strategy.clear(self._item, "login-failures", self._name, key)


@contextmanager
def _reachable() -> Iterator[None]:
    try:
        yield
    except StorageError as exc:
        raise StorageUnavailable() from exc


def client_ip(connection: HTTPConnection) -> str:
    """The peer's address. It reflects `X-Forwarded-For` only when the peer is in `BFF_TRUSTED_PROXIES`
    (uvicorn's ProxyHeadersMiddleware, added in app.py only then), so a browser cannot choose it."""
    return connection.client.host if connection.client is not None else "unknown"


@dataclass(frozen=True)
class LoginThrottle:
    per_ip: FailureCounter
    per_user: FailureCounter

    async def check(self, ip: str, username: str) -> None:
        """Raise 429 while either the IP or the username has used up its failures."""
        wait = max(await self.per_ip.retry_after(ip), await self.per_user.retry_after(_user_key(username)))
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                "Too many failed sign-in attempts. Try again later.",
                headers={"Retry-After": str(max(math.ceil(wait), 1))},
            )

    async def failed(self, ip: str, username: str) -> None:
        await self.per_ip.record_failure(ip)
        await self.per_user.record_failure(_user_key(username))

    async def succeeded(self, username: str) -> None:
        # The IP's count stays: one right guess must not reset a spray of wrong ones from that IP.
        await self.per_user.clear(_user_key(username))


def _user_key(username: str) -> str:
    # Case variants of one name share a budget, so "Alice" and "alice" cannot double the guesses.
    return username.casefold()
