"""`BFF_DAILY_OUTPUT_CHARS`: generated characters a user may receive through relays per UTC day.

Charged as the text flows, not when a run ends: each run charges what it relayed in batches (every
`BATCH_CHARS` characters or `BATCH_SECONDS`, whichever comes first), each an atomic increment in the
shared storage that answers the new total. A run whose charge crosses the budget ends there, with the
in-band error `budget_exhausted`. So however many runs a user has open, on however many replicas,
the budget is exceeded by at most one batch per open run, not by whole answers. `/run` is charged
with its whole answer before it is returned, and only if it fits (atomically, too).

A charge the storage cannot take (Redis down) is kept in this process and applied when it is back
(`settle_forever`), bounded in how many users it keeps, and counted in metrics; never dropped silently.
Token-mode mints are not charged here: their output never passes through us, so they are bounded by
the `mint` rate limit instead.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time

import anyio

from proxy.errors import BUDGET_EXHAUSTED, ApiError
from proxy.metrics import Metrics
from proxy.storage import Storage, StorageUnavailable

logger = logging.getLogger("proxy.budget")

BATCH_CHARS = 4096
BATCH_SECONDS = 1.0
# Counters are kept two days, so a run that ends just after midnight still finds yesterday's key.
COUNTER_TTL_SECONDS = 2 * 86400
SETTLE_SECONDS = 5.0
MAX_DEFERRED_USERS = 10_000


def spent() -> ApiError:
    """`budget_exhausted`, with the seconds until the budget renews."""
    return BUDGET_EXHAUSTED.error(retry_after=until_midnight())


def until_midnight() -> int:
    """Seconds until the next UTC midnight, when every user's budget renews."""
    midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), dt_time(), UTC)
    return max(1, math.ceil((midnight - datetime.now(UTC)).total_seconds()))


class OutputBudget:
    def __init__(self, storage: Storage, daily_chars: int, *, metrics: Metrics) -> None:
        self._storage = storage
        self.daily_chars = daily_chars
        self._metrics = metrics
        self._deferred: dict[str, int] = {}  # counter key -> characters not yet charged

    @staticmethod
    def _key(user_id: str) -> str:
        return f"output:{user_id}:{datetime.now(UTC).date().isoformat()}"

    async def ensure_left(self, user_id: str) -> None:
        if self.daily_chars and await self.used(user_id) >= self.daily_chars:
            raise spent()

    async def used(self, user_id: str) -> int:
        return await self._storage.get_counter(self._key(user_id)) if self.daily_chars else 0

    def meter(self, user_id: str) -> Meter | None:
        """What a run charges through, batch by batch; None when there is no budget."""
        return Meter(self, user_id) if self.daily_chars else None

    async def charge(self, user_id: str, chars: int) -> int | None:
        """Add `chars`; the user's new total, or None when the storage cannot be reached (the charge
        is then kept, and applied later)."""
        if chars <= 0:
            return None
        key = self._key(user_id)
        try:
            return await self._storage.incr(key, chars, ttl=COUNTER_TTL_SECONDS)
        except StorageUnavailable:
            self._defer(key, chars)
            return None

    async def charge_whole(self, user_id: str, chars: int) -> None:
        """Charge a whole answer that has not been sent yet, if it fits in what is left; otherwise
        raise `budget_exhausted` and charge nothing (`/run`)."""
        if not self.daily_chars or chars <= 0:
            return
        total = await self._storage.incr_up_to(self._key(user_id), chars, self.daily_chars, ttl=COUNTER_TTL_SECONDS)
        if total is None:
            raise spent()

    def _defer(self, key: str, chars: int) -> None:
        if key not in self._deferred and len(self._deferred) >= MAX_DEFERRED_USERS:
            logger.error("output budget charge dropped: too many deferred", extra={"chars": chars})
            self._metrics.budget_charges.labels("dropped").inc(chars)
            return
        logger.warning("output budget charge deferred: storage unreachable", extra={"chars": chars})
        self._deferred[key] = self._deferred.get(key, 0) + chars
        self._metrics.budget_charges.labels("deferred").inc(chars)

    async def settle_forever(self) -> None:
        """Apply deferred charges once the storage answers again. Runs for the life of the process."""
        while True:
            await anyio.sleep(SETTLE_SECONDS)
            await self.settle()

    async def settle(self) -> None:
        for key, chars in list(self._deferred.items()):
            try:
                await self._storage.incr(key, chars, ttl=COUNTER_TTL_SECONDS)
            except StorageUnavailable:
                return  # still down: try again next round
            if self._deferred.get(key) == chars:
                del self._deferred[key]
            else:  # more was deferred meanwhile
                self._deferred[key] -= chars
            self._metrics.budget_charges.labels("settled").inc(chars)


class Meter:
    """One run's charges: characters add up here and go to the storage in batches."""

    __slots__ = ("_budget", "_charged_at", "_uncharged", "_user_id")

    def __init__(self, budget: OutputBudget, user_id: str) -> None:
        self._budget = budget
        self._user_id = user_id
        self._uncharged = 0
        self._charged_at = time.monotonic()

    def room(self) -> int:
        """How many characters (at most) may be relayed before the next charge is due."""
        return max(1, BATCH_CHARS - self._uncharged)

    def add(self, chars: int) -> bool:
        """Count `chars`; True when a batch is due (`charge` it)."""
        self._uncharged += chars
        return self._uncharged >= BATCH_CHARS or time.monotonic() - self._charged_at >= BATCH_SECONDS

    async def charge(self) -> bool:
        """Charge what is counted; True when the budget is now spent."""
        chars, self._uncharged, self._charged_at = self._uncharged, 0, time.monotonic()
        # Shielded: a run stopped while its charge is on the way must not lose it, nor send it twice.
        with anyio.CancelScope(shield=True):
            total = await self._budget.charge(self._user_id, chars)
        return total is not None and total >= self._budget.daily_chars
