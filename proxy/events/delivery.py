"""Delivering run events: at least once, in the background, never in a run's way.

A run that ends hands its event to `RunEvents.ended`, which only appends it to a bounded queue in
memory: the run awaits nothing, so a slow or dead receiver (or storage) cannot slow a relay. A pump
moves queued events into the storage's outbox (proxy/storage: in this process with memory, in Redis
with Redis, where it survives a restart and any replica may deliver it). Deliverers claim due events
from the outbox for a lease, so one event is in flight on one replica at a time, POST them with the
Standard Webhooks headers, and then delete (any 2xx), retry later (anything else, redirects
included: none is followed), or give up after `BFF_EVENTS_MAX_ATTEMPTS`.

A replica that dies mid-delivery leaves its claim to lapse, and another delivers the event again:
receivers dedupe by `webhook-id` (the same on every attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import aiohttp
import anyio

from proxy.events.payload import RunEnded
from proxy.events.signing import signed_headers
from proxy.metrics import Metrics
from proxy.storage import Storage, StorageUnavailable
from proxy.storage.base import PendingEvent

logger = logging.getLogger("proxy.events")

DELIVERIES_AT_ONCE = 4
# Outbox reads when nothing woke the deliverers: how soon a retry falls due, or an event another
# replica queued is seen.
POLL_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600.0
# A claim outlives the attempt's timeout by this much, so a live deliverer is never overtaken.
LEASE_SLACK_SECONDS = 10.0
# At shutdown, events still in memory get this long to reach the outbox.
FLUSH_SECONDS = 5.0
HEADERS = {"Content-Type": "application/json", "User-Agent": "workflow-bff"}


@dataclass(frozen=True)
class DeliverySettings:
    url: str
    key: bytes
    include_text: bool
    timeout: float
    retry_seconds: float
    max_attempts: int
    max_pending: int
    max_pending_bytes: int


def retry_delay(settings: DeliverySettings, attempts: int) -> float:
    """How long after its `attempts`-th failure an event is tried again: the retry time doubling each
    time, up to an hour, less up to half of it at random, so that events that failed together (a
    receiver's outage) do not all come back at the same moment."""
    delay = min(settings.retry_seconds * 2.0 ** (attempts - 1), MAX_RETRY_SECONDS)
    return delay * random.uniform(0.5, 1.0)


class RunEvents:
    def __init__(self, settings: DeliverySettings, storage: Storage, metrics: Metrics) -> None:
        self.settings = settings
        self._storage = storage
        self._outcomes = metrics.events
        self._queued: deque[RunEnded] = deque()
        self._queued_bytes = 0
        self._queue_woken = asyncio.Event()
        self._storing = anyio.Lock()  # the pump, or the flush at shutdown
        self._due = asyncio.Event()  # something may be due in the outbox, or a deliverer is free
        self._in_flight = 0
        self._lease = settings.timeout + LEASE_SLACK_SECONDS
        # Its own session: the upstream's has the upstream's timeouts and pool, and a receiver that
        # hangs must not hold connections the relays need.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=DELIVERIES_AT_ONCE),
            headers=HEADERS,
            trust_env=False,
        )

    @property
    def include_text(self) -> bool:
        return self.settings.include_text

    def ended(self, event: RunEnded) -> None:
        """A run ended. Never waits: the event is queued in memory, or dropped (and counted) if
        `BFF_EVENTS_MAX_PENDING` (or their bytes) are already queued here."""
        queued = self._queued_bytes + event.size
        if len(self._queued) >= self.settings.max_pending or queued > self.settings.max_pending_bytes:
            self._dropped(event.event_id, "too many events queued in memory")
            return
        self._queued_bytes = queued
        self._queued.append(event)
        self._queue_woken.set()

    async def pump_forever(self) -> None:
        """Move queued events into the outbox, for the life of the process."""
        while True:
            await self._queue_woken.wait()
            self._queue_woken.clear()
            try:
                await self._store_queued()
            except StorageUnavailable:  # kept in memory (bounded) until the storage is back
                await anyio.sleep(POLL_SECONDS)
                self._queue_woken.set()
            except Exception:  # a bug: that event is lost, not the pump (nor, with it, the process)
                logger.exception("run event not stored")
                self._dropped(self._unqueue().event_id, "it could not be stored")
                self._queue_woken.set()

    async def flush(self) -> None:
        """At shutdown: put what is still in memory into the outbox (where Redis keeps it for the
        next process), briefly."""
        with anyio.move_on_after(FLUSH_SECONDS):
            try:
                await self._store_queued()
            except StorageUnavailable:
                logger.warning("run events not stored at shutdown", extra={"events": len(self._queued)})

    async def _store_queued(self) -> None:
        async with self._storing:
            while self._queued:
                await self._store(self._queued[0])
                self._unqueue()  # only once stored: a storage error leaves it for the next try

    def _unqueue(self) -> RunEnded:
        event = self._queued.popleft()
        self._queued_bytes -= event.size
        return event

    async def _store(self, event: RunEnded) -> None:
        settings = self.settings
        body = event.body(time.time())
        if await self._storage.add_event(event.event_id, body, settings.max_pending, settings.max_pending_bytes):
            self._outcomes.labels("queued").inc()
            self._due.set()
        else:
            self._dropped(event.event_id, "the outbox is full (BFF_EVENTS_MAX_PENDING or _BYTES)")

    async def deliver_forever(self) -> None:
        """Claim due events and deliver them, a few at a time, for the life of the process."""
        poll = min(POLL_SECONDS, self.settings.retry_seconds)
        async with anyio.create_task_group() as deliveries:
            while True:
                self._due.clear()
                claimed: list[PendingEvent] = []
                if free := DELIVERIES_AT_ONCE - self._in_flight:
                    try:
                        claimed = await self._storage.claim_events(free, self._lease)
                    except StorageUnavailable:
                        pass  # logged where it was met (storage/redis.py); the next poll tries again
                    except Exception:  # a bug: this round is lost, not the deliverers
                        logger.exception("run events not claimed")
                for event in claimed:
                    self._in_flight += 1
                    deliveries.start_soon(self._deliver, event)
                if len(claimed) < free or not free:
                    with anyio.move_on_after(poll):
                        await self._due.wait()

    async def _deliver(self, event: PendingEvent) -> None:
        try:
            try:
                failure = await self._post(event)
            except anyio.get_cancelled_exc_class():
                # Shutting down: due again at once (for another replica, or the next process),
                # rather than when the claim lapses.
                with anyio.CancelScope(shield=True), contextlib.suppress(StorageUnavailable):
                    await self._storage.retry_event(event.event_id, 0)
                raise
            with anyio.CancelScope(shield=True):
                await self._settle(event, failure)
        except StorageUnavailable:
            pass  # the claim lapses and the event is tried again
        except Exception:  # a bug: the same, but said
            logger.exception("run event delivery failed")
        finally:
            self._in_flight -= 1
            self._due.set()

    async def _post(self, event: PendingEvent) -> str | None:
        """One attempt; what went wrong, or None for a 2xx."""
        body = event.body.encode()
        headers = signed_headers(self.settings.key, event.event_id, int(time.time()), body)
        try:
            async with self._http.post(self.settings.url, data=body, headers=headers, allow_redirects=False) as answer:
                return None if 200 <= answer.status < 300 else f"answered {answer.status}"
        except TimeoutError:
            return "timed out"
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def _settle(self, event: PendingEvent, failure: str | None) -> None:
        if failure is None:
            await self._storage.delete_event(event.event_id)
            self._outcomes.labels("delivered").inc()
            return
        # Neither the URL (it may carry a token) nor the body (the text) is logged.
        found = {"event_id": event.event_id, "attempt": event.attempts, "failure": failure}
        if event.attempts >= self.settings.max_attempts:
            await self._storage.delete_event(event.event_id)
            self._outcomes.labels("failed").inc()
            logger.warning("run event given up after its last attempt", extra=found)
            return
        await self._storage.retry_event(event.event_id, retry_delay(self.settings, event.attempts))
        self._outcomes.labels("retried").inc()
        logger.warning("run event delivery failed; retrying", extra=found)

    def _dropped(self, event_id: str, why: str) -> None:
        self._outcomes.labels("dropped").inc()
        logger.warning("run event dropped: %s", why, extra={"event_id": event_id})

    async def aclose(self) -> None:
        await self._http.close()
