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

Every user's output is counted, with a budget or without: `GET /api/usage` shows users their own
today, and `python -m proxy usage` ranks them for the operator. Each charge also adds to the day's
ranking (`output:<day>`, user by total) in the same storage operation, so counting costs one round
trip per batch. Without a budget nothing waits on the count, and nothing needs it to the second: a
run's charges go in the background, one at a time, in batches of `COUNT_BATCH_CHARS` and at its end
(a batch every second for each of a thousand open answers kept Redis too busy to admit new ones).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time

import anyio

from proxy.errors import BUDGET_EXHAUSTED, ApiError
from proxy.metrics import Metrics
from proxy.storage import Ranking, Storage, StorageUnavailable

logger = logging.getLogger("proxy.budget")

BATCH_CHARS = 4096
BATCH_SECONDS = 1.0
# Counters are kept two days, so a run that ends just after midnight still finds yesterday's key.
COUNTER_TTL_SECONDS = 2 * 86400
SETTLE_SECONDS = 5.0
MAX_DEFERRED_USERS = 10_000
# What a meter charges when it has no batch due: room for any read (see `Meter.room`).
UNBOUNDED = 2**62
# Without a budget, a run is counted every this many characters, and at its end.
COUNT_BATCH_CHARS = 64 * 1024


def spent() -> ApiError:
    """`budget_exhausted`, with the seconds until the budget renews."""
    return BUDGET_EXHAUSTED.error(retry_after=until_midnight())


def until_midnight() -> int:
    """Seconds until the next UTC midnight, when every user's budget renews."""
    return max(1, math.ceil((next_midnight() - datetime.now(UTC)).total_seconds()))


def next_midnight() -> datetime:
    return datetime.combine(datetime.now(UTC).date() + timedelta(days=1), dt_time(), UTC)


def today() -> str:
    """The UTC day output is counted in, as `YYYY-MM-DD`."""
    return datetime.now(UTC).date().isoformat()


def ranking_name(day: str) -> str:
    """The ranking of a day's output by user."""
    return f"output:{day}"


class OutputBudget:
    def __init__(self, storage: Storage, daily_chars: int, *, metrics: Metrics) -> None:
        self._storage = storage
        self.daily_chars = daily_chars
        self._metrics = metrics
        # (user, day) -> characters not yet charged
        self._deferred: dict[tuple[str, str], int] = {}

    @staticmethod
    def key(user_id: str, day: str) -> str:
        """The counter of the user's output on `day`."""
        return f"output:{user_id}:{day}"

    async def ensure_left(self, user_id: str) -> None:
        if self.daily_chars and await self.used(user_id) >= self.daily_chars:
            raise spent()

    async def used(self, user_id: str) -> int:
        """Today's output of `user_id` as every replica charged it, budget or not."""
        return await self._storage.get_counter(self.key(user_id, today()))

    def meter(self, user_id: str) -> Meter:
        """What a run charges through, batch by batch."""
        return Meter(self, user_id)

    async def charge(self, user_id: str, chars: int) -> int | None:
        """Add `chars`; the user's new total, or None when the storage cannot be reached (the charge
        is then kept, and applied later)."""
        if chars <= 0:
            return None
        day = today()
        try:
            return await self._storage.incr(
                self.key(user_id, day), chars, ttl=COUNTER_TTL_SECONDS, ranking=Ranking(ranking_name(day), user_id)
            )
        except StorageUnavailable:
            self._defer(user_id, day, chars)
            return None

    async def charge_whole(self, user_id: str, chars: int) -> None:
        """Charge a whole answer that has not been sent yet, if it fits in what is left; otherwise
        raise `budget_exhausted` and charge nothing (`/run`). Without a budget it is only counted."""
        if chars <= 0:
            return
        if not self.daily_chars:
            await self.charge(user_id, chars)
            return
        day = today()
        total = await self._storage.incr_up_to(
            self.key(user_id, day),
            chars,
            self.daily_chars,
            ttl=COUNTER_TTL_SECONDS,
            ranking=Ranking(ranking_name(day), user_id),
        )
        if total is None:
            raise spent()

    def _defer(self, user_id: str, day: str, chars: int) -> None:
        key = (user_id, day)
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
            user_id, day = key
            try:
                await self._storage.incr(
                    self.key(user_id, day), chars, ttl=COUNTER_TTL_SECONDS, ranking=Ranking(ranking_name(day), user_id)
                )
            except StorageUnavailable:
                return  # still down: try again next round
            if self._deferred.get(key) == chars:
                del self._deferred[key]
            else:  # more was deferred meanwhile
                self._deferred[key] -= chars
            self._metrics.budget_charges.labels("settled").inc(chars)


class Meter:
    """One run's charges: characters add up here and go to the storage in batches."""

    __slots__ = ("_budget", "_charged_at", "_counting", "_uncharged", "_user_id")

    def __init__(self, budget: OutputBudget, user_id: str) -> None:
        self._budget = budget
        self._user_id = user_id
        self._uncharged = 0
        self._charged_at = time.monotonic()
        self._counting: asyncio.Task[None] | None = None  # the charge in the background, without a budget

    def room(self) -> int:
        """How many characters (at most) may be relayed before the next charge is due; without a
        budget, any number: the count needs no piece boundaries."""
        if not self._budget.daily_chars:
            return UNBOUNDED
        return max(1, BATCH_CHARS - self._uncharged)

    def add(self, chars: int) -> bool:
        """Count `chars`; True when a batch is due against a budget (`charge` it). Without a budget a
        due batch is charged in the background here, and the answer is always False."""
        self._uncharged += chars
        if self._budget.daily_chars:
            return self._uncharged >= BATCH_CHARS or time.monotonic() - self._charged_at >= BATCH_SECONDS
        if self._uncharged < COUNT_BATCH_CHARS:
            return False
        if self._counting is None or self._counting.done():
            # One charge at a time: while one is on its way, the characters wait for the next.
            chars, self._uncharged, self._charged_at = self._uncharged, 0, time.monotonic()
            self._counting = asyncio.get_running_loop().create_task(self._count(chars))
        return False

    async def charge(self) -> bool:
        """Charge what is counted (after the background charge, if one is on its way); True when
        the budget is now spent."""
        # Shielded: a run stopped while its charge is on the way must not lose it, nor send it twice.
        with anyio.CancelScope(shield=True):
            if self._counting is not None:
                await asyncio.wait({self._counting})
            chars, self._uncharged, self._charged_at = self._uncharged, 0, time.monotonic()
            total = await self._budget.charge(self._user_id, chars)
        return total is not None and bool(self._budget.daily_chars) and total >= self._budget.daily_chars

    async def _count(self, chars: int) -> None:
        try:
            await self._budget.charge(self._user_id, chars)
        except Exception:  # a task of its own: nobody else would hear of it
            logger.exception("output count failed")
