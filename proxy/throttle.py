"""Login throttling: failed sign-ins counted per client IP and per username, then 429.

Only failures count, so a user who types the password right is never slowed down by their own
sign-ins. The counters live behind one small interface (`FailureCounter`); `MemoryFailureCounter`
keeps them in this process. Shared limits across replicas belong to the storage / rate-limit layer:
a counter over it only has to implement the same three methods.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from starlette.requests import HTTPConnection

from proxy.errors import ApiError

# Bounds memory when someone sprays usernames or IPs: the oldest keys are forgotten first.
MAX_TRACKED_KEYS = 50_000


class FailureCounter(Protocol):
    async def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when it may try now."""

    async def record_failure(self, key: str) -> None: ...

    async def clear(self, key: str) -> None: ...


class MemoryFailureCounter:
    """A sliding window: at most `limit` failures per key in the last `window` seconds."""

    def __init__(self, limit: int, window: float, *, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    async def retry_after(self, key: str) -> float:
        failures = self._recent(key)
        if len(failures) < self.limit:
            return 0.0
        return max(failures[-self.limit] + self.window - time.monotonic(), 0.0)

    async def record_failure(self, key: str) -> None:
        failures = self._recent(key)
        failures.append(time.monotonic())
        while len(failures) > self.limit:
            failures.popleft()
        self._failures[key] = failures
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    async def clear(self, key: str) -> None:
        self._failures.pop(key, None)

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures.get(key, deque())
        cutoff = time.monotonic() - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures


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
