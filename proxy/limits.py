"""Per-user rate limits (CONTRACT B5, B8 `BFF_RATE_LIMITS`), in slowapi's limit syntax ("30/minute").

Why not slowapi's own request path: its checks are synchronous (`Limiter._check_request_limit` calls
`limits`' sync `hit` and `get_window_stats` inline), so with Redis every check blocks the event loop
and stalls every open stream; its pure-ASGI middleware breaks streaming responses; and it cannot
charge after a stream ends. `bench/limiter_stall.py` measures the stall. So the checks here are the
same `limits` strategies slowapi uses, through `limits.aio` and its async storage, with slowapi's
header conventions (`X-RateLimit-Limit`, `-Remaining`, `-Reset`, `Retry-After`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping

import anyio
from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage as LimitsStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.util import WindowStats

from proxy.errors import ApiError
from proxy.metrics import Metrics
from proxy.storage import Storage, StorageUnavailable

logger = logging.getLogger("proxy.limits")

LIMIT_NAMES = frozenset({"mint", "relay", "login"})
DEFAULT_RATE_LIMITS = "mint=30/minute;relay=20/minute;login=10/minute"
# Stream-slot lease: renewed every third of it while the stream runs; a crashed replica's slots
# come back within this long.
LEASE_SECONDS = 30.0
# The cap a lapsed slot is taken back under: none (see `Lease.renew`).
UNCAPPED = 2**31


class RateLimitConfigError(ValueError):
    pass


def parse_rate_limits(value: str) -> dict[str, list[RateLimitItem]]:
    """`"mint=30/minute;relay=20/minute,500/day;login=10/minute"` → limits by name. A name left out
    keeps its default: setting only `relay` must not switch the sign-in limit off."""
    return {**_parse_rate_limits(DEFAULT_RATE_LIMITS), **_parse_rate_limits(value)}


def _parse_rate_limits(value: str) -> dict[str, list[RateLimitItem]]:
    parsed: dict[str, list[RateLimitItem]] = {}
    for entry in (part.strip() for part in value.split(";")):
        if not entry:
            continue
        name, sep, spec = entry.partition("=")
        name = name.strip()
        example = "as in mint=30/minute;relay=20/minute,500/day"
        if not sep:
            raise RateLimitConfigError(f"{entry!r} names no limit: write name=limits, {example}")
        if name not in LIMIT_NAMES:
            names = ", ".join(sorted(LIMIT_NAMES))
            raise RateLimitConfigError(f"{name!r} is not a limit name (use {names}), {example}")
        if "=" in spec:  # "mint=30/minute,relay=20/minute"
            raise RateLimitConfigError(f"{entry!r}: separate the limits of different names with ';', {example}")
        parsed[name] = parse_limit(spec)
    return parsed


def parse_limit(spec: str) -> list[RateLimitItem]:
    try:
        items = parse_many(spec)
    except ValueError:
        raise RateLimitConfigError(f"{spec!r} is not a limit like 30/minute or 30/minute,500/day") from None
    if not items:
        raise RateLimitConfigError(f"{spec!r} names no limit")
    return items


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

    async def check(self, name: str, key: str, *, workflow: str | None = None) -> dict[str, str]:
        """Count one request against limit `name` (and the workflow's own limit) for `key`, a user id
        or, before sign-in, a client IP.

        Returns the X-RateLimit-* headers of the tightest limit. Raises a 429 ApiError with Retry-After
        when a limit is spent, and 503 when the limit storage cannot be reached: limits fail closed, or
        an outage would let one user burn the account's credits.
        """
        checks = [(name, item) for item in self._limits.get(name, [])]
        if workflow is not None:
            checks += [(f"{name}:{workflow}", item) for item in self._per_workflow.get(workflow, [])]
        try:
            # Test every limit before counting against any: a request refused by one limit must not
            # use up the others. A single limit needs no test: its hit counts only when it allows.
            for scope, item in checks if len(checks) > 1 else []:
                if not await self._strategy.test(item, "bff", scope, key):
                    raise await self._refusal(name, scope, item, key)
            headers: dict[str, str] = {}
            tightest = math.inf
            for scope, item in checks:
                if not await self._strategy.hit(item, "bff", scope, key):  # lost a race with another request
                    raise await self._refusal(name, scope, item, key)
                stats = await self._strategy.get_window_stats(item, "bff", scope, key)
                if stats.remaining < tightest:
                    tightest, headers = stats.remaining, self._headers(item, stats)
        except StorageError as exc:
            raise StorageUnavailable() from exc
        return headers

    async def _refusal(self, name: str, scope: str, item: RateLimitItem, key: str) -> ApiError:
        stats = await self._strategy.get_window_stats(item, "bff", scope, key)
        self._metrics.rate_limited.labels(name).inc()
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return ApiError(
            429,
            "rate_limited",
            f"Too many requests; try again in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after), **self._headers(item, stats)},
        )

    @staticmethod
    def _headers(item: RateLimitItem, stats: WindowStats) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(item.amount),
            "X-RateLimit-Remaining": str(stats.remaining),
            "X-RateLimit-Reset": str(math.ceil(stats.reset_time)),
        }


class Lease:
    """One held stream slot: renewed while its run goes on (`RunManager.keep_forever`), released when
    it ends."""

    def __init__(self, slots: StreamSlots, name: str, holder: str) -> None:
        self._slots = slots
        self._name = name
        self._holder = holder
        self.held = True

    async def renew(self) -> None:
        """One renewal. One that fails (storage briefly down) is retried next round: the run goes
        on, and at worst the slot lapses early, never late. A slot that did lapse (storage down for
        longer than the lease) is taken back, even above the cap: the run is still going, and
        counting it is what keeps the user's next stream out until one ends."""
        slots = self._slots
        try:
            renewed = await slots.storage.renew_lease(self._name, self._holder, slots.lease_seconds)
            # Not renewed: it lapsed while the run goes on, or the run just ended and its release
            # reached storage first. Only the first is taken back, and let go if the run ends
            # while it is.
            if not renewed and self.held:
                logger.warning("stream slot had lapsed; taking it back")
                await slots.storage.acquire_lease(self._name, self._holder, UNCAPPED, slots.lease_seconds)
                if not self.held:
                    await self._release()
        except StorageUnavailable:
            logger.warning("stream slot renewal failed; retrying")

    async def release(self) -> None:
        self.held = False
        await self._release()

    async def _release(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._slots.storage.release_lease(self._name, self._holder)
            except StorageUnavailable:
                logger.warning("stream slot release failed; it lapses by itself")


class StreamSlots:
    """`BFF_MAX_CONCURRENT_STREAMS`: open runs per user, exact across replicas.

    A slot is a lease in the shared storage. A replica that crashes mid-run cannot release its
    slots, so leases are short and renewed while the run goes on: a dead replica's slots come back
    within one `LEASE_SECONDS`.
    """

    def __init__(self, storage: Storage, limit: int, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self.storage = storage
        self.limit = limit
        self.lease_seconds = lease_seconds

    async def acquire(self, user_id: str, holder: str | None = None) -> Lease:
        name = f"streams:{user_id}"
        holder = holder or secrets.token_hex(8)
        if not await self.storage.acquire_lease(name, holder, self.limit, self.lease_seconds):
            raise ApiError(
                429,
                "too_many_streams",
                f"At most {self.limit} answers can stream at once; wait for one to finish.",
                headers={"Retry-After": "5"},
            )
        return Lease(self, name, holder)

    async def open(self, user_id: str) -> int:
        return await self.storage.count_leases(f"streams:{user_id}")
