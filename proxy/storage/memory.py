"""Storage in this process's memory: one process only, lost on restart.

Every method runs without awaiting anything, so each is atomic on the event loop, as the interface asks.
Session expiry follows the wall clock (`expires_at` is a timestamp); leases and counters follow the
monotonic clock, so a clock step can neither free a slot early nor hold it forever.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import defaultdict

from proxy.storage.base import PendingEvent, Ranking, SessionRecord

PURGE_EVERY = 256


@dataclasses.dataclass
class _Counter:
    value: int
    expires_at: float  # monotonic


@dataclasses.dataclass
class _Event:
    body: str
    due: float  # monotonic
    size: int  # the body's UTF-8 bytes
    attempts: int = 0


@dataclasses.dataclass
class _Ranking:
    totals: dict[str, int]  # member -> total
    expires_at: float  # monotonic


class MemoryStorage:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._by_user: defaultdict[str, set[str]] = defaultdict(set)
        # Back-channel logout's indexes; a key stays listed after its session ends (harmless: session
        # keys are never reused) until the index is used or its last session's record is purged.
        self._by_index: defaultdict[str, set[str]] = defaultdict(set)
        self._leases: dict[str, dict[str, float]] = {}  # name -> holder -> monotonic expiry
        self._counters: dict[str, _Counter] = {}
        self._events: dict[str, _Event] = {}
        # (due, id) of every pending event, and stale pairs left by retries and deletes: a pair counts
        # only while it matches its event's `due` (skipped when popped), so no claim scans the outbox.
        self._due: list[tuple[float, str]] = []
        self._event_bytes = 0
        self._rankings: dict[str, _Ranking] = {}
        self._writes = 0

    # Sessions

    async def get_session(self, key: str) -> SessionRecord | None:
        record = self._sessions.get(key)
        if record is not None and record.expires_at <= time.time():
            self._forget(key)
            return None
        return record

    async def save_session(self, record: SessionRecord) -> None:
        self._sessions[record.key] = record
        self._by_user[record.user_id].add(record.key)
        for index in record.indexes():
            self._by_index[index].add(record.key)
        self._count_write()

    async def touch_session(self, key: str, last_seen: float) -> bool:
        record = await self.get_session(key)
        if record is None:
            return False
        self._sessions[key] = dataclasses.replace(record, last_seen=last_seen)
        return True

    async def delete_session(self, key: str) -> None:
        self._forget(key)

    async def delete_user_sessions(self, user_id: str) -> list[str]:
        now = time.time()
        removed = []
        for key in sorted(self._by_user.pop(user_id, set())):
            record = self._sessions.pop(key, None)
            if record is not None and record.expires_at > now:
                removed.append(key)
        return removed

    async def delete_indexed_sessions(self, index: str) -> list[tuple[str, str]]:
        removed = []
        for key in sorted(self._by_index.pop(index, set())):
            record = await self.get_session(key)
            if record is not None:
                self._forget(key)
                removed.append((key, record.user_id))
        return removed

    async def update_idp_tokens(self, key: str, sealed: str, expires_at: float) -> bool:
        record = await self.get_session(key)
        if record is None:
            return False
        self._sessions[key] = dataclasses.replace(record, idp_tokens=sealed, idp_expires_at=expires_at)
        return True

    async def user_sessions(self, user_id: str) -> list[SessionRecord]:
        found = [await self.get_session(key) for key in sorted(self._by_user.get(user_id, set()))]
        return sorted((record for record in found if record is not None), key=lambda r: r.created_at)

    # Leases

    async def acquire_lease(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        holders = self._live_holders(name)
        if holder not in holders and len(holders) >= limit:
            return False
        holders[holder] = time.monotonic() + ttl
        self._leases[name] = holders
        self._count_write()
        return True

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        holders = self._live_holders(name)
        if holder not in holders:
            return False
        holders[holder] = time.monotonic() + ttl
        return True

    async def release_lease(self, name: str, holder: str) -> None:
        holders = self._leases.get(name)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._leases[name]

    async def count_leases(self, name: str) -> int:
        return len(self._live_holders(name))

    async def lease_holders(self, name: str) -> list[str]:
        return list(self._live_holders(name))

    # Counters

    async def incr(self, key: str, amount: int, ttl: float, ranking: Ranking | None = None) -> int:
        counter = self._live_counter(key)
        if counter is None:
            counter = self._counters[key] = _Counter(0, time.monotonic() + ttl)
            self._count_write()
        counter.value += amount
        if ranking is not None:
            ranked = self._live_ranking(ranking.name)
            if ranked is None:
                ranked = self._rankings[ranking.name] = _Ranking({}, time.monotonic() + ttl)
                self._count_write()
            ranked.totals[ranking.member] = ranked.totals.get(ranking.member, 0) + amount
        return counter.value

    async def incr_up_to(
        self, key: str, amount: int, limit: int, ttl: float, ranking: Ranking | None = None
    ) -> int | None:
        counter = self._live_counter(key)
        if (0 if counter is None else counter.value) + amount > limit:
            return None
        return await self.incr(key, amount, ttl, ranking)

    async def get_counter(self, key: str) -> int:
        counter = self._live_counter(key)
        return 0 if counter is None else counter.value

    async def top_ranked(self, name: str, count: int) -> list[tuple[str, int]]:
        ranked = self._live_ranking(name)
        if ranked is None or count <= 0:
            return []
        # Highest first, equal totals by member in reverse, as Redis's ZREVRANGE orders them.
        best = sorted(ranked.totals.items(), key=lambda item: (item[1], item[0]), reverse=True)
        return best[:count]

    # Outbox

    async def add_event(self, event_id: str, body: str, limit: int, max_bytes: int) -> bool:
        if event_id in self._events:
            return True
        size = len(body.encode())
        if len(self._events) >= limit or self._event_bytes + size > max_bytes:
            return False
        self._event_bytes += size
        self._events[event_id] = _Event(body, time.monotonic(), size)
        heapq.heappush(self._due, (self._events[event_id].due, event_id))
        return True

    async def claim_events(self, count: int, lease: float) -> list[PendingEvent]:
        now = time.monotonic()
        claimed: list[PendingEvent] = []
        while self._due and self._due[0][0] <= now and len(claimed) < count:
            due, event_id = heapq.heappop(self._due)
            event = self._events.get(event_id)
            if event is None or event.due != due:
                continue
            event.attempts += 1
            self._schedule(event_id, event, now + lease)
            claimed.append(PendingEvent(event_id, event.body, event.attempts))
        return claimed

    async def retry_event(self, event_id: str, delay: float) -> None:
        event = self._events.get(event_id)
        if event is not None:
            self._schedule(event_id, event, time.monotonic() + delay)

    async def delete_event(self, event_id: str) -> None:
        event = self._events.pop(event_id, None)
        if event is not None:
            self._event_bytes -= event.size
        if not self._events:
            self._due.clear()

    async def count_events(self) -> int:
        return len(self._events)

    def _schedule(self, event_id: str, event: _Event, due: float) -> None:
        event.due = due
        heapq.heappush(self._due, (due, event_id))
        if len(self._due) > 4 * len(self._events) + PURGE_EVERY:  # mostly stale pairs: rebuild
            self._due = [(e.due, i) for i, e in self._events.items()]
            heapq.heapify(self._due)

    # Lifecycle

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _live_holders(self, name: str) -> dict[str, float]:
        holders = self._leases.get(name)
        if holders is None:
            return {}
        now = time.monotonic()
        for holder in [h for h, expires_at in holders.items() if expires_at <= now]:
            del holders[holder]
        if not holders:
            del self._leases[name]
        return holders

    def _live_counter(self, key: str) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at <= time.monotonic():
            del self._counters[key]
            return None
        return counter

    def _live_ranking(self, name: str) -> _Ranking | None:
        ranked = self._rankings.get(name)
        if ranked is not None and ranked.expires_at <= time.monotonic():
            del self._rankings[name]
            return None
        return ranked

    def _forget(self, key: str) -> None:
        record = self._sessions.pop(key, None)
        if record is not None:
            keys = self._by_user.get(record.user_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[record.user_id]

    def _count_write(self) -> None:
        """Every so many writes, drop what has expired, so idle keys cannot grow memory without bound."""
        self._writes += 1
        if self._writes % PURGE_EVERY == 0:
            now = time.time()
            for key in [k for k, r in self._sessions.items() if r.expires_at <= now]:
                self._forget(key)
            for index in list(self._by_index):
                self._by_index[index] &= self._sessions.keys()
                if not self._by_index[index]:
                    del self._by_index[index]
            for name in list(self._leases):
                self._live_holders(name)
            for key in list(self._counters):
                self._live_counter(key)
            for name in list(self._rankings):
                self._live_ranking(name)
