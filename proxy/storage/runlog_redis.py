"""Run logs in Redis Streams, so a follower or a stop can arrive at any replica.

The producing replica keeps its runs' logs in memory too (`ChunkLog`), so its own followers never
wait on Redis, and mirrors every entry into a stream with an explicit id `0-<n>` (the entry's
position): a reader elsewhere asks `XREAD BLOCK … 0-<after>` for everything past what it has, and a
missing id means entries were lost, which it reports as the end of the run rather than skip them.

Everything a run writes reaches Redis from one writer per replica, which sends whatever has piled up
since its last write, from every run, in one pipeline: a busy replica makes fewer, larger writes
instead of falling behind. A run's creation (its meta, `runalive`, its chat's pointer) and its close
go the same way, with its first and last entries, so starting and ending a run add no round trip of
their own. Until the writer has written them, this replica answers for its runs from memory.

Keys (under the storage prefix, `bff:`):
- `run:<id>`: the run's `RunMeta` as JSON;
- `runlog:<id>`: the stream of entries (`k` kind, `v` value);
- `runalive:<id>`: present while the producer renews it (`heartbeat`); a reader that finds it gone
  and no `END` knows the producer died;
- `chat:<hash>`: the id of a chat's latest run.
All of them expire: `ttl` after creation while the run goes on, `keep_seconds` after it ended.
Control messages go over the pub/sub channel `runs`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from proxy.storage.redis import (
    KEY_PREFIX,
    SOCKET_TIMEOUT_SECONDS,
    UNREACHABLE,
    connection_pool,
    milliseconds,
    reachable,
)
from proxy.storage.runlog import MAX_ENTRIES, ChunkLog, ControlHandler, Entry, Expiring, RunMeta, chat_key, lost_entry

logger = logging.getLogger("proxy.storage")

# How long a replica's runs stay "alive" without a heartbeat, unless the caller says otherwise.
ALIVE_SECONDS = 30.0
RECONNECT_SECONDS = 1.0
# A reader past this many entries gives up on XREAD's COUNT and takes the rest next time.
READ_COUNT = 10_000

CLOSE = """
-- KEYS: meta, log, alive, chat. ARGV: keep ms, run id. The chat's pointer only while it is this run's.
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[4]) == ARGV[2] then redis.call('PEXPIRE', KEYS[4], ARGV[1]) end
"""


class RedisRunLogs:
    def __init__(self, url: str, *, key_prefix: str = KEY_PREFIX, alive_seconds: float = ALIVE_SECONDS) -> None:
        self._client = redis.asyncio.Redis(connection_pool=connection_pool(url))
        # Blocking reads and the subscription hold a connection each for seconds: a pool of their
        # own, with a socket timeout above the longest block, keeps them from starving short commands.
        self.block_seconds = alive_seconds / 3
        self._blocking = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=self.block_seconds + SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        )
        self._prefix = key_prefix
        self.alive_seconds = alive_seconds
        # This replica's own runs' logs, read here without Redis while they are kept.
        self._local: Expiring[RedisChunkLog] = Expiring()
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        # Writes queued so far, and of those the ones written (or given up on): a caller waits for the
        # batches holding what was queued before it asked, never for a writer busy for ever after.
        self._queued = 0
        self._done = 0
        self._progress: asyncio.Event | None = None

    def key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    async def create(self, meta: RunMeta, *, ttl: float) -> ChunkLog:
        log = RedisChunkLog(meta, self, milliseconds(ttl))
        self._local.put(meta.run_id, log, ttl)
        self.enqueue(_Write(log, CREATE))
        log.created = self._queued
        return log

    def _chat(self, user_id: str, alias: str, chat_id: str) -> str:
        return self.key("chat", chat_key(user_id, alias, chat_id))

    async def meta(self, run_id: str) -> RunMeta | None:
        local = self._local.get(run_id)
        if local is not None:  # this replica's own run: perhaps not written yet
            return local.meta
        with reachable():
            raw = await self._client.get(self.key("run", run_id))
        if raw is None:
            return None
        try:
            fields = json.loads(raw)
            return RunMeta.of(fields)
        except (TypeError, ValueError):  # not written by us
            return None

    async def chat_run(self, user_id: str, alias: str, chat_id: str) -> str | None:
        await self.written()  # a chat's latest run may be this replica's, still on its way
        with reachable():
            raw = await self._client.get(self._chat(user_id, alias, chat_id))
        if raw is None:
            return None
        run_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        return run_id if await self.meta(run_id) is not None else None

    async def read(self, run_id: str, after: int, wait: float | None) -> list[Entry]:
        local = self._local.get(run_id)
        if local is not None:
            return await local.read(after, wait)
        return await self._read_remote(run_id, after, wait)

    async def _read_remote(self, run_id: str, after: int, wait: float | None) -> list[Entry]:
        key = self.key("runlog", run_id)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            block = self.block_seconds if deadline is None else min(self.block_seconds, deadline - time.monotonic())
            with reachable():
                found = await self._blocking.xread({key: f"0-{after}"}, count=READ_COUNT, block=milliseconds(block))
            entries = _entries(found, after)
            if entries:
                return entries
            with reachable():
                alive = await self._client.exists(self.key("runalive", run_id))
            if not alive:
                # Ended (or died) while we waited: what it wrote before then, if anything, else lost.
                with reachable():
                    found = await self._client.xread({key: f"0-{after}"}, count=READ_COUNT)
                return _entries(found, after) or [lost_entry()]
            if deadline is not None and time.monotonic() >= deadline:
                return []

    async def heartbeat(self, run_ids: list[str], ttl: float) -> None:
        if not run_ids:
            return
        with reachable():
            async with self._client.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.set(self.key("runalive", run_id), b"1", px=milliseconds(ttl))
                await pipe.execute()

    async def send(self, kind: str, run_id: str) -> None:
        with reachable():
            await self._client.publish(self.key("channel", "runs"), f"{kind} {run_id}")

    async def listen(self, handler: ControlHandler) -> None:
        channel = self.key("channel", "runs")
        while True:
            try:
                async with self._blocking.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    while True:
                        message = await pubsub.get_message(timeout=self.block_seconds)
                        if message is not None and message.get("type") == "message":
                            kind, _, run_id = bytes(message["data"]).decode(errors="replace").partition(" ")
                            handler(kind, run_id)
            except UNREACHABLE as exc:
                logger.warning("run control channel lost; resubscribing", extra={"error": type(exc).__name__})
                await asyncio.sleep(RECONNECT_SECONDS)

    async def close(self) -> None:
        await self._client.aclose()
        await self._blocking.aclose()

    def enqueue(self, write: _Write) -> None:
        self._pending.append(write)
        self._queued += 1
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """One writer for every run of this replica: whatever piled up since its last write, from
        every run, goes to Redis in one pipeline, so a busy replica makes fewer, larger writes."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write(batch)
                except Exception:  # a reader elsewhere sees the gap as a lost run; this replica goes on
                    logger.warning("run log entries not mirrored to storage", extra={"entries": len(batch)})
                self._done += len(batch)
                if self._progress is not None:
                    self._progress.set()
                    self._progress = None
        finally:
            self._flusher = None

    async def _write(self, batch: list[_Write]) -> None:
        with reachable():
            async with self._client.pipeline(transaction=False) as pipe:
                for write in batch:
                    log, meta = write.log, write.log.meta
                    if write.kind == CREATE:
                        pipe.set(self.key("run", meta.run_id), json.dumps(meta.__dict__), px=log.ttl_ms)
                        pipe.set(self.key("runalive", meta.run_id), b"1", px=milliseconds(self.alive_seconds))
                        if meta.chat_id is not None:
                            pipe.set(self._chat(meta.user_id, meta.alias, meta.chat_id), meta.run_id, px=log.ttl_ms)
                    elif write.kind == ENTRY:
                        assert write.entry is not None
                        kind, value = write.entry
                        key = self.key("runlog", meta.run_id)
                        pipe.xadd(key, {"k": kind, "v": value}, id=f"0-{write.position}", maxlen=MAX_ENTRIES + 2)
                        if write.position == 1:  # the first entry made the stream
                            pipe.pexpire(key, log.ttl_ms)
                    elif meta.chat_id is None:
                        pipe.pexpire(self.key("run", meta.run_id), write.position)
                        pipe.pexpire(self.key("runlog", meta.run_id), write.position)
                        pipe.delete(self.key("runalive", meta.run_id))
                    else:  # EVAL, not a registered script: one in a pipeline costs a SCRIPT EXISTS first
                        keys = [self.key(kind, meta.run_id) for kind in ("run", "runlog", "runalive")]
                        keys.append(self._chat(meta.user_id, meta.alias, meta.chat_id))
                        pipe.eval(CLOSE, len(keys), *keys, write.position, meta.run_id)
                await pipe.execute()

    async def written(self) -> None:
        """Until what was queued before this call was written (or given up on)."""
        await self.until(self._queued)

    async def until(self, queued: int) -> None:
        """Until the first `queued` writes were written (or given up on)."""
        while self._done < queued:
            if self._progress is None:
                self._progress = asyncio.Event()
            await self._progress.wait()

    async def finish(self, log: RedisChunkLog, ending: Entry, keep_seconds: float) -> None:
        """The run's last entry, then its keys kept `keep_seconds` more, in the writer's next write."""
        log.append(ending)
        self.enqueue(_Write(log, CLOSE_RUN, milliseconds(keep_seconds)))
        await self.written()
        self._local.put(log.meta.run_id, log, keep_seconds)


class RedisChunkLog(ChunkLog):
    """A producer's log: read here from memory, mirrored to Redis by the replica's one writer."""

    def __init__(self, meta: RunMeta, logs: RedisRunLogs, ttl_ms: int) -> None:
        super().__init__(meta)
        self._logs = logs
        self.ttl_ms = ttl_ms
        self.created = 0  # the writer's count of writes once its creation was queued

    async def shared(self) -> None:
        await self._logs.until(self.created)

    def append(self, entry: Entry) -> None:
        super().append(entry)
        self._logs.enqueue(_Write(self, ENTRY, len(self), entry))

    async def close(self, ending: Entry, keep_seconds: float) -> None:
        await self._logs.finish(self, ending, keep_seconds)


# What the writer writes: a run's creation, one of its entries, or its close.
CREATE, ENTRY, CLOSE_RUN = "create", "entry", "close"


@dataclass(slots=True)
class _Write:
    log: RedisChunkLog
    kind: str
    position: int = 0  # an entry's position in its log; a close's keep time in milliseconds
    entry: Entry | None = None


def _entries(found: Any, after: int) -> list[Entry]:
    """Entries from an XREAD answer (`[[key, [(id, fields), ...]]]`), in order, up to the first gap."""
    entries: list[Entry] = []
    for _, items in found or []:
        for entry_id, fields in items:
            if int(entry_id.split(b"-")[1]) != after + len(entries) + 1:
                return [*entries, lost_entry()]
            entries.append((fields[b"k"].decode(), bytes(fields[b"v"])))
    return entries
