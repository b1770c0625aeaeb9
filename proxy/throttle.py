"""Login throttling: failed sign-ins counted with three separate budgets, then 429.

- per account *and* address (`BFF_LOGIN_FAILURES_PER_USER`, 5): guessing one account from one place;
- per account from anywhere (`BFF_LOGIN_FAILURES_PER_ACCOUNT`, 20): guessing it from many places;
- per address (`BFF_LOGIN_FAILURES_PER_IP`, 100): an address that is clearly attacking, spraying
  guesses over many accounts, is refused whatever it sends.
So behind one NAT (a school, an office), one person's wrong guesses do not lock a classmate with the
right password out: the classmate's account and the shared address each have budgets of their own.

Only failures count, so a user who types the password right is never slowed down by their own
sign-ins. The counters live behind one small interface (`FailureCounter`); `WindowFailureCounter`
keeps them in the shared limits storage, so a guesser gains nothing by spreading over replicas.
An attempt still being verified counts as a failure until it is known not to be one: otherwise a
burst of parallel guesses would all pass the check before the first of them was counted. That count
is per process, so each replica can have at most the remaining budget in flight at once.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from limits import RateLimitItemPerSecond
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.requests import HTTPConnection

from proxy.errors import RATE_LIMITED
from proxy.storage import reachable

# Refused because other attempts for the key are still being verified: they end within seconds.
IN_FLIGHT_RETRY_SECONDS = 1.0


class FailureCounter(Protocol):
    async def retry_after(self, key: str, attempts: int = 1) -> float:
        """Seconds until `key` may make `attempts` attempts (any of them may fail); 0 when it may now."""

    async def record_failure(self, key: str) -> None: ...

    async def clear(self, key: str) -> None: ...


class WindowFailureCounter:
    """At most `limit` failures per key in a moving window of `window` seconds, counted in the shared
    limits storage (BFF_STORAGE_URL), so every replica sees the same count."""

    def __init__(self, storage: LimitsStorage, name: str, limit: int, window: int) -> None:
        self._strategy = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerSecond(limit, window)
        self._name = name

    async def retry_after(self, key: str, attempts: int = 1) -> float:
        with reachable():
            stats = await self._strategy.get_window_stats(self._item, "login-failures", self._name, key)
        if stats.remaining >= attempts:
            return 0.0
        if stats.remaining > 0:
            return IN_FLIGHT_RETRY_SECONDS
        return max(stats.reset_time - time.time(), IN_FLIGHT_RETRY_SECONDS)

    async def record_failure(self, key: str) -> None:
        with reachable():
            await self._strategy.hit(self._item, "login-failures", self._name, key)

    async def clear(self, key: str) -> None:
        with reachable():
            await self._strategy.clear(self._item, "login-failures", self._name, key)


def client_ip(connection: HTTPConnection) -> str:
    """The peer's address. It reflects `X-Forwarded-For` only when the peer is in `BFF_TRUSTED_PROXIES`
    (uvicorn's ProxyHeadersMiddleware, added in app.py only then), so a browser cannot choose it."""
    return connection.client.host if connection.client is not None else "unknown"


@dataclass(frozen=True)
class LoginThrottle:
    per_ip: FailureCounter
    per_user: FailureCounter  # keyed by account and address
    per_account: FailureCounter
    # Attempts being verified in this process, by ("ip", address) and ("user", name).
    _in_flight: Counter[tuple[str, str]] = field(default_factory=Counter)

    @asynccontextmanager
    async def attempt(self, ip: str, username: str) -> AsyncIterator[None]:
        """Around one sign-in attempt: 429 while the IP or the username has used up its failures,
        counting the attempts in flight (this one included) as failures until they end. Record a
        failure with `failed` before leaving the block."""
        keys = self._keys(ip, username)
        ahead = {}  # per key: this attempt and those in flight when it arrived
        for key in keys:  # counted before the check awaits storage, so a burst sees itself
            self._in_flight[key] += 1
            ahead[key] = self._in_flight[key]
        try:
            wait = max([await counter.retry_after(key[1], ahead[key]) for key, counter in keys.items()])
            if wait > 0:
                message = "Too many failed sign-in attempts. Try again later."
                raise RATE_LIMITED.error(message, retry_after=max(math.ceil(wait), 1))
            yield
        finally:
            for key in keys:
                self._in_flight[key] -= 1
                if not self._in_flight[key]:
                    del self._in_flight[key]

    def _keys(self, ip: str, username: str) -> dict[tuple[str, str], FailureCounter]:
        account = _user_key(username)
        return {
            ("ip", ip): self.per_ip,
            ("user", f"{account} {ip}"): self.per_user,
            ("account", account): self.per_account,
        }

    async def failed(self, ip: str, username: str) -> None:
        for (_, key), counter in self._keys(ip, username).items():
            await counter.record_failure(key)

    async def succeeded(self, ip: str, username: str) -> None:
        # The address's count stays: one right guess must not reset a spray of wrong ones from there.
        keys = self._keys(ip, username)
        del keys[("ip", ip)]
        for (_, key), counter in keys.items():
            await counter.clear(key)


def _user_key(username: str) -> str:
    # Case variants of one name share a budget, so "Alice" and "alice" cannot double the guesses.
    return username.casefold()
