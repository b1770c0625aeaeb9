"""Run logs: what a run produced, kept so that any follower can read it, live or after the fact.

A run's log is a list of entries, each `(kind, value)`: `OPEN` when the upstream answered, `TEXT`
with the upstream's bytes, and `END` last, with how the run ended. A follower reads "everything
after the first `n` entries", so whoever is behind gets all that is waiting in one read.

Two backends share this interface and one test suite (tests/test_runlog.py):
- `MemoryRunLogs` keeps logs in this process: one process, the embedded default;
- `RedisRunLogs` (proxy/storage/runlog_redis.py) mirrors them into Redis Streams, so a follower or
  a stop can arrive at any replica.

Logs are bounded: the run caps its bytes, and a log is forgotten `keep_seconds` after its run ended
(`BFF_RESUME_SECONDS`), or `ttl` after it was created if its run never ends (a crashed replica).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import heapq
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

OPEN = "o"
TEXT = "t"
END = "e"
Entry = tuple[str, bytes]
# Control messages between replicas: "stop" a run, or a follower elsewhere is still "follow"ing it.
ControlHandler = Callable[[str, str], None]
V = TypeVar("V")
# The most entries one run's log holds (a run that would write more ends as too large), so a stream of
# one-byte chunks cannot make a log of millions of entries; Redis streams are capped at it too.
MAX_ENTRIES = 100_000
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
OPEN_ENTRY: Entry = (OPEN, b"")


@dataclass(frozen=True)
class RunMeta:
    """Who a run belongs to, and what a resumed stream must repeat (the UI message id)."""

    run_id: str
    user_id: str
    message_id: str
    alias: str
    chat_id: str | None = None
    started_at: float = 0.0  # Unix time, for GET /api/usage (0: written by a version that did not say)
    # The W3C traceparent of the request that started it (tracing on): a resume on another replica
    # links its trace to that one.
    trace: str | None = None

    @classmethod
    def of(cls, fields: object) -> RunMeta:
        """A meta read back from the storage; fields this version does not know (written by a newer
        one, mid-upgrade) are left out rather than making the run unreadable. TypeError if it is no
        object or one it needs is missing."""
        if not isinstance(fields, dict):
            raise TypeError("a run's meta is an object")
        known = {name: value for name, value in fields.items() if name in _META_FIELDS}
        return cls(**known)


_META_FIELDS = frozenset(field.name for field in dataclasses.fields(RunMeta))


def chat_key(user_id: str, alias: str, chat_id: str) -> str:
    """The index key of a user's chat: a hash, so any chat id a client picks makes a safe key."""
    return hashlib.sha256(f"{user_id}\0{alias}\0{chat_id}".encode()).hexdigest()


class ChunkLog:
    """One run's log as its producer writes it, readable in this process without waiting on storage.

    Stored compactly, because an open stream keeps its whole answer: the text of every `TEXT` entry
    in one buffer with the offset where each ends (a few bytes per chunk beyond the text itself,
    where a list of entries cost over a hundred). Entries are built again when they are read.
    """

    def __init__(self, meta: RunMeta) -> None:
        self.meta = meta
        self._opened = False
        self._text = bytearray()
        self._ends = array("I")  # where each TEXT entry ends in `_text` (below 4 GiB: see BFF_MAX_ANSWER_BYTES)
        self._ending: bytes | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return self._opened + len(self._ends) + (self._ending is not None)

    @property
    def ended(self) -> bool:
        return self._ending is not None

    def text(self) -> bytes:
        """Everything the run wrote, in one piece (for its end event)."""
        return bytes(self._text)

    def append(self, entry: Entry) -> None:
        """Add an entry and wake every reader waiting for one. Never waits: a run writes to no one."""
        kind, value = entry
        if kind == TEXT:
            self._text += value
            self._ends.append(len(self._text))
        elif kind == OPEN:
            self._opened = True
        else:
            self._ending = value
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def shared(self) -> None:
        """Until every replica can find this run (in one process: at once)."""

    async def close(self, ending: Entry, keep_seconds: float) -> None:
        """Write the `END` entry; the log stays readable for `keep_seconds`."""
        self.append(ending)

    async def read(self, after: int, wait: float | None) -> list[Entry]:
        """The entries after the first `after`, waiting up to `wait` seconds (None: for as long as
        it takes) for one to arrive; [] when none did."""
        if len(self) <= after:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await (waiter if wait is None else asyncio.wait_for(waiter, wait))
            except TimeoutError:
                return []
        return self._entries(after)

    def _entries(self, after: int) -> list[Entry]:
        entries: list[Entry] = []
        if self._opened and after == 0:
            entries.append(OPEN_ENTRY)
        ends, text = self._ends, self._text
        first = max(after - self._opened, 0)
        start = ends[first - 1] if first else 0
        for index in range(first, len(ends)):
            entries.append((TEXT, bytes(text[start : ends[index]])))
            start = ends[index]
        if self._ending is not None:
            entries.append((END, self._ending))
        return entries


class RunLogs(Protocol):
    async def create(self, meta: RunMeta, *, ttl: float) -> ChunkLog:
        """A new log for a run starting now; if the run has a chat, it becomes that chat's run. Other
        replicas see it once it is `written` (Redis: with the writer's next write, well before the
        response's first byte, which waits on the upstream)."""

    async def written(self) -> None:
        """Until what this replica has written so far can be read by every replica."""

    async def meta(self, run_id: str) -> RunMeta | None:
        """Whose run it is, while its log is kept; None for an unknown or forgotten run."""

    async def chat_run(self, user_id: str, alias: str, chat_id: str) -> str | None:
        """The id of the chat's latest run while its log is kept."""

    async def read(self, run_id: str, after: int, wait: float | None) -> list[Entry]:
        """As `ChunkLog.read`, from any replica. A log whose producer is gone without ending it (or
        that was forgotten) reads as ended, with `END` and reason "lost", never as a wait forever."""

    async def heartbeat(self, run_ids: list[str], ttl: float) -> None:
        """The producer is alive and running these runs, for `ttl` seconds more."""

    async def send(self, kind: str, run_id: str) -> None:
        """A control message to whichever replica runs `run_id` (`listen` there receives it)."""

    async def listen(self, handler: ControlHandler) -> None:
        """Deliver control messages to `handler(kind, run_id)`, for the life of the process."""

    async def close(self) -> None: ...


class Expiring(Generic[V]):
    """Values by key, each forgotten at its own time (monotonic). A heap of (time, key) orders the
    forgetting, so a write drops only what is due (amortised O(log n)) and keys nobody reads again
    cannot grow memory; a key written again leaves a stale heap entry, skipped when it comes due."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[V, float]] = {}
        self._due: list[tuple[float, str]] = []

    def put(self, key: str, value: V, seconds: float) -> None:
        now = time.monotonic()
        due, items = self._due, self._items
        while due and due[0][0] <= now:
            _, stale = heapq.heappop(due)
            found = items.get(stale)
            if found is not None and found[1] <= now:
                del items[stale]
        forget_at = now + seconds
        items[key] = (value, forget_at)
        heapq.heappush(due, (forget_at, key))

    def get(self, key: str) -> V | None:
        found = self._items.get(key)
        if found is None or found[1] <= time.monotonic():
            self._items.pop(key, None)
            return None
        return found[0]

    def clear(self) -> None:
        self._items.clear()
        self._due.clear()


class MemoryRunLogs:
    """Run logs in this process's memory: a control message goes straight to the handler."""

    def __init__(self) -> None:
        self._logs: Expiring[ChunkLog] = Expiring()
        self._chats: Expiring[str] = Expiring()
        self._handler: ControlHandler | None = None

    async def written(self) -> None:
        pass  # one process: nothing is on its way

    async def create(self, meta: RunMeta, *, ttl: float) -> ChunkLog:
        log = _MemoryChunkLog(meta, self)
        self._keep(log, ttl, take_chat=True)
        return log

    def _keep(self, log: ChunkLog, seconds: float, *, take_chat: bool = False) -> None:
        """Keep `log` `seconds` more, and its chat's pointer to it: taken over by a new run
        (`take_chat`), extended only while no newer run has taken it."""
        meta = log.meta
        self._logs.put(meta.run_id, log, seconds)
        if meta.chat_id is not None:
            key = chat_key(meta.user_id, meta.alias, meta.chat_id)
            if take_chat or self._chats.get(key) == meta.run_id:
                self._chats.put(key, meta.run_id, seconds)

    async def meta(self, run_id: str) -> RunMeta | None:
        log = self._logs.get(run_id)
        return None if log is None else log.meta

    async def chat_run(self, user_id: str, alias: str, chat_id: str) -> str | None:
        run_id = self._chats.get(chat_key(user_id, alias, chat_id))
        return run_id if run_id is not None and self._logs.get(run_id) is not None else None

    async def read(self, run_id: str, after: int, wait: float | None) -> list[Entry]:
        log = self._logs.get(run_id)
        if log is None:
            return [lost_entry()]
        return await log.read(after, wait)

    async def heartbeat(self, run_ids: list[str], ttl: float) -> None:
        return None  # one process: its runs are alive as long as it is

    async def send(self, kind: str, run_id: str) -> None:
        if self._handler is not None:
            self._handler(kind, run_id)

    async def listen(self, handler: ControlHandler) -> None:
        self._handler = handler
        await asyncio.Event().wait()  # until cancelled with the process

    async def close(self) -> None:
        self._logs.clear()
        self._chats.clear()


class _MemoryChunkLog(ChunkLog):
    def __init__(self, meta: RunMeta, logs: MemoryRunLogs) -> None:
        super().__init__(meta)
        self._logs = logs

    async def close(self, ending: Entry, keep_seconds: float) -> None:
        self.append(ending)
        self._logs._keep(self, keep_seconds)


def lost_entry() -> Entry:
    """The `END` a reader sees for a log that can no longer end by itself (proxy/runs/ending.py)."""
    return (END, b'{"reason": "lost"}')


def utf8_chars(data: bytes) -> int:
    """Characters in UTF-8 `data`, counted by their first bytes, so a character split across two
    chunks counts once, in the chunk where it starts (each byte that is no UTF-8 counts as one)."""
    return len(data.translate(None, _CONTINUATION_BYTES))
