"""In-process storage for `limits.aio`'s moving window, without a thread hop per key.

`limits.aio`'s own `MemoryStorage` starts an expiry task after every hit, and that task visits every
key it holds through `asyncio.to_thread`: with 200 signed-in users, each request paid for hundreds of
thread hand-offs, which measured as about a quarter of a relay's CPU (A/B runs of 3,000 relays). Nothing
here awaits, so nothing needs a lock or a thread: a key's expired entries are dropped when the key is
next read, and once a minute a sweep drops the keys that nobody has used for a whole window. The
sweep visits every live key in one go, about 1 ms per 1,000 keys: keys live as long as their window,
so many users under day-long limits are a reason to use Redis.

Only the moving window is supported, the one strategy workflow-bff uses (proxy/rate_limiter.py,
proxy/throttle.py).
"""

from __future__ import annotations

import bisect
import time

from limits.aio.storage import MovingWindowSupport
from limits.aio.storage import Storage as LimitsStorage

SWEEP_SECONDS = 60.0


class MovingWindowMemory(LimitsStorage, MovingWindowSupport):
    STORAGE_SCHEME = None  # built by open_limits_storage, never registered for a URL scheme

    def __init__(self) -> None:
        super().__init__()
        # Per key: when each entry was acquired, oldest first, and how long an entry lasts.
        self._entries: dict[str, list[float]] = {}
        self._expiry: dict[str, int] = {}
        self._next_sweep = time.monotonic() + SWEEP_SECONDS  # not wall-clock: that can be set back

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError

    def _live(self, key: str, expiry: int, now: float) -> list[float]:
        """The key's entries still in the window ending `now`, with the older ones dropped."""
        entries = self._entries.setdefault(key, [])
        self._expiry[key] = expiry
        del entries[: bisect.bisect_right(entries, now - expiry)]
        return entries

    def _sweep(self, now: float) -> None:
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        for key, entries in list(self._entries.items()):
            if not entries or entries[-1] <= now - self._expiry[key]:
                self._forget(key)

    def _forget(self, key: str) -> None:
        self._entries.pop(key, None)
        self._expiry.pop(key, None)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        now = time.time()
        if time.monotonic() >= self._next_sweep:
            self._sweep(now)
        entries = self._live(key, expiry, now)
        if len(entries) + amount > limit:
            return False
        # Never before the newest entry, should the clock be set back: the list stays in order.
        entries.extend([max(now, entries[-1]) if entries else now] * amount)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """When the window's oldest entry was acquired (now if none), and how many entries it holds."""
        now = time.time()
        if key not in self._entries:
            return now, 0
        entries = self._live(key, expiry, now)
        return (entries[0] if entries else now), len(entries)

    async def clear(self, key: str) -> None:
        self._forget(key)

    async def reset(self) -> int | None:
        count = len(self._entries)
        self._entries.clear()
        self._expiry.clear()
        return count

    async def check(self) -> bool:
        return True

    # The fixed-window counters `limits.aio.storage.Storage` also declares; no strategy used here reads them.
    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("MovingWindowMemory supports the moving window only")

    async def get(self, key: str) -> int:
        raise NotImplementedError("MovingWindowMemory supports the moving window only")

    async def get_expiry(self, key: str) -> float:
        raise NotImplementedError("MovingWindowMemory supports the moving window only")
