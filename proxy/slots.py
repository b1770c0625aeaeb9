"""Stream slots (`BFF_MAX_CONCURRENT_STREAMS`): how many runs one user may have going at once, exact
across replicas, as leases in the shared storage.
"""

from __future__ import annotations

import logging
import secrets

import anyio

from proxy.errors import TOO_MANY_STREAMS, ApiError
from proxy.storage import Storage, StorageUnavailable

logger = logging.getLogger("proxy.limits")

# Stream-slot lease: renewed every third of it while the stream runs; a crashed replica's slots
# come back within this long.
LEASE_SECONDS = 30.0
# What a user refused at the cap is told to wait: answers take seconds, not minutes.
RETRY_AFTER_SECONDS = 5
# The cap a lapsed slot is taken back under: none (see `Lease.renew`).
UNCAPPED = 2**31


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
        name = self.name(user_id)
        holder = holder or secrets.token_hex(8)
        if not await self.storage.acquire_lease(name, holder, self.limit, self.lease_seconds):
            raise self.refusal()
        return Lease(self, name, holder)

    @staticmethod
    def name(user_id: str) -> str:
        """The lease pool of the user's slots."""
        return f"streams:{user_id}"

    def refusal(self) -> ApiError:
        """The 429 of a request that found every slot of its user held."""
        message = f"At most {self.limit} answers can stream at once; wait for one to finish."
        return TOO_MANY_STREAMS.error(message, retry_after=RETRY_AFTER_SECONDS)

    def taken(self, user_id: str, holder: str) -> Lease:
        """The lease of a slot that `holder` took in storage by other means (one script that admits a
        relay at once: proxy/storage/admission_redis.py)."""
        return Lease(self, self.name(user_id), holder)

    async def open(self, user_id: str) -> int:
        return await self.storage.count_leases(self.name(user_id))

    async def holders(self, user_id: str) -> list[str]:
        """Who holds the user's slots: the ids of their runs."""
        return await self.storage.lease_holders(self.name(user_id))


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
