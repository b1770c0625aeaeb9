"""Storage in Redis, shared by every replica: the same sessions, leases and counters whichever one answers.

Each operation that reads and writes is one Lua script, so it is atomic in Redis and exact across
replicas. Leases and counters expire on Redis's clock (`TIME` inside the scripts), never on a replica's,
so replicas with skewed clocks still agree on when a lease has lapsed.

Keys (all under one prefix, `bff:` by default):
- `session:<key>`: a hash with the record's fields, expiring at the record's absolute `expires_at`;
- `user:<user_id>`: a sorted set of that user's session keys scored by their expiry, for logout-all;
- `oidc-sid:<hash>`, `oidc-sub:<hash>`: the same, by identity-provider session and subject, for
  back-channel logout (a session's key stays listed after a logout until it expires or is used);
- `lease:<name>`: a sorted set of holders scored by the expiry of their lease (milliseconds);
- `counter:<key>`: an integer;
- `events:due`, `events:body`, `events:attempts`, `events:bytes`: the outbox, a sorted set of event ids
  scored by when each is due (milliseconds, a claimed one's lease end), with the bodies and attempt
  counts in hashes, and the bodies' total size (bounded: answers' text must not fill Redis).
- `ranking:<name>`: a sorted set of totals by member (a day's output by user), added to in the same
  script as the counter it goes with, so a charge stays one round trip.

Scripts build session keys from the prefix, so Redis Cluster is not supported: use one primary (with
replicas or Sentinel for failover handled by the URL you give).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import limits.errors
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.storage.base import OPTIONAL_FIELDS, PendingEvent, Ranking, SessionRecord, StorageUnavailable

logger = logging.getLogger("proxy.storage")

KEY_PREFIX = "bff:"
# A request waits at most this long on a Redis that stopped answering before it gets a 503.
SOCKET_TIMEOUT_SECONDS = 2.0
# Connections per process to Redis; commands beyond that wait (see connection_pool).
POOL_MAX_CONNECTIONS = 200

# Errors that mean "Redis cannot be reached right now", as opposed to a bug in a command.
# BusyLoadingError (Redis still loading its data after a restart) is a ConnectionError.
UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a primary turned replica during a failover
    redis.exceptions.OutOfMemoryError,  # full (maxmemory with noeviction): it takes no writes until freed
    redis.exceptions.BusyLoadingError,  # restarting, still loading its data
    OSError,
    # The rate limits' storage (`limits`, over the same Redis) wraps whatever redis-py raised in one
    # type of its own, so it cannot say more (proxy/storage/__init__.py: `open_limits_storage`).
    limits.errors.StorageError,
)

SAVE_SESSION = """
-- KEYS: session, then every index listing it (the user's first). ARGV: expiry ms, member, field, value, ...
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', KEYS[i], last[2]) end
end
"""

UPDATE_IDP_TOKENS = """
-- KEYS: session. ARGV: sealed tokens, their expiry
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'idp_tokens', ARGV[1], 'idp_expires_at', ARGV[2])
return 1
"""

DELETE_INDEXED_SESSIONS = """
-- KEYS: index. ARGV: session key prefix, user index prefix. As DELETE_USER_SESSIONS, for any index;
-- returns member, user_id pairs of the live sessions removed.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local removed = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. member
  local fields = redis.call('HMGET', key, 'user_id', 'expires_at')
  if redis.call('DEL', key) == 1 and fields[1] then
    redis.call('ZREM', ARGV[2] .. fields[1], member)
    if tonumber(fields[2]) and tonumber(fields[2]) > now then
      table.insert(removed, member)
      table.insert(removed, fields[1])
    end
  end
end
redis.call('DEL', KEYS[1])
return removed
"""

TOUCH_SESSION = """
-- KEYS: session. ARGV: last_seen
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
return 1
"""

DELETE_SESSION = """
-- KEYS: session. ARGV: user index prefix, member
local user_id = redis.call('HGET', KEYS[1], 'user_id')
redis.call('DEL', KEYS[1])
if user_id then redis.call('ZREM', ARGV[1] .. user_id, ARGV[2]) end
"""

DELETE_USER_SESSIONS = """
-- KEYS: user index. ARGV: session key prefix. Deletes them all; returns the members whose session was
-- still live. Live is judged by the record's own expires_at, as get_session judges it: Redis expires
-- the key only at the next whole millisecond, so the key alone can outlive the session by up to 1 ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local removed = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. member
  local expires_at = tonumber(redis.call('HGET', key, 'expires_at'))
  if redis.call('DEL', key) == 1 and expires_at and expires_at > now then table.insert(removed, member) end
end
redis.call('DEL', KEYS[1])
return removed
"""

# Every lease script first drops the lapsed holders, so a crashed replica's leases free themselves.
LEASE_PRELUDE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local function keep_until_last_lease()
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
end
"""

ACQUIRE_LEASE = (
    LEASE_PRELUDE
    + """
-- KEYS: lease set. ARGV: holder, limit, ttl ms
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
keep_until_last_lease()
return 1
"""
)

RENEW_LEASE = (
    LEASE_PRELUDE
    + """
-- KEYS: lease set. ARGV: holder, ttl ms
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
keep_until_last_lease()
return 1
"""
)

COUNT_LEASES = (
    LEASE_PRELUDE
    + """
return redis.call('ZCARD', KEYS[1])
"""
)

# Counter scripts take an optional second key, a ranking, and its member as their last argument: the
# amount goes to the member's total there too. Every ttl is set once, when its key is created.
RANK = """
local function rank(amount, ttl)
  if KEYS[2] then
    redis.call('ZINCRBY', KEYS[2], amount, ARGV[#ARGV])
    if redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
"""

INCR = (
    RANK
    + """
-- KEYS: counter[, ranking]. ARGV: amount, ttl ms[, member].
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
rank(ARGV[1], ARGV[2])
return value
"""
)

INCR_UP_TO = (
    RANK
    + """
-- KEYS: counter[, ranking]. ARGV: amount, limit, ttl ms[, member]. Adds only if the result stays within the limit.
local value = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1])
if value > tonumber(ARGV[2]) then return -1 end
redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
rank(ARGV[1], ARGV[3])
return value
"""
)

LEASE_HOLDERS = (
    LEASE_PRELUDE
    + """
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)

# The outbox's scripts. KEYS (all three): the due set, the bodies, the attempt counts.
OUTBOX_PRELUDE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""

ADD_EVENT = (
    OUTBOX_PRELUDE
    + """
-- ARGV: id, body, limit, byte limit
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
if tonumber(redis.call('GET', KEYS[4]) or '0') + #ARGV[2] > tonumber(ARGV[4]) then return 0 end
redis.call('INCRBY', KEYS[4], #ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""
)

# One script, so two replicas never claim the same event: each due id's score moves to the end of
# its lease before anyone else can read it as due.
CLAIM_EVENTS = (
    OUTBOX_PRELUDE
    + """
-- ARGV: count, lease ms. Returns id, body, attempts, ... for each event claimed.
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    table.insert(claimed, id)
    table.insert(claimed, body)
    table.insert(claimed, redis.call('HINCRBY', KEYS[3], id, 1))
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return claimed
"""
)

RETRY_EVENT = (
    OUTBOX_PRELUDE
    + """
-- ARGV: id, delay ms
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
"""
)

DELETE_EVENT = """
-- ARGV: id
redis.call('ZREM', KEYS[1], ARGV[1])
local size = redis.call('HSTRLEN', KEYS[2], ARGV[1])
if size > 0 then redis.call('DECRBY', KEYS[4], size) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
-- An empty outbox weighs nothing: whatever made the total drift (keys deleted by hand, an outbox
-- written before the total was kept) ends here.
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[4]) end
"""


def milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@contextmanager
def reachable() -> Iterator[None]:
    """Turn "Redis cannot be reached" into `StorageUnavailable`, around every call to Redis: ours, and
    the rate limits' through `limits`. The client reconnects on its next call."""
    try:
        yield
    except UNREACHABLE as exc:
        logger.warning("storage unreachable", extra={"error": type(exc).__name__})
        raise StorageUnavailable() from exc


def connection_pool(url: str, **options: Any) -> redis.asyncio.BlockingConnectionPool:
    """A pool for a `redis.asyncio` client that fails fast while Redis is down and recovers by itself.

    redis-py's default asyncio pool refuses the 101st concurrent command outright ("Too many
    connections"), which under load would turn limit checks into 503s; a blocking pool makes a command
    wait for a free connection instead, up to the socket timeout. One immediate retry replaces a pooled
    connection that died with a Redis restart; more retries with backoff (redis-py's default) would hold
    every request for seconds before the 503. Options in the URL's query string take precedence.
    """
    return redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        **options,
    )


def session_record(key: str, fields: Mapping[Any, Any]) -> SessionRecord | None:
    """The record stored as the hash `fields`, or None when it is missing or not written by us."""
    try:
        return SessionRecord(
            key=key,
            user_id=str(fields["user_id"]),
            kind=str(fields["kind"]),
            created_at=float(fields["created_at"]),
            last_seen=float(fields["last_seen"]),
            expires_at=float(fields["expires_at"]),
            display_name=str(fields.get("display_name", "")),
            idp_sid_hash=str(fields.get("idp_sid_hash", "")),
            idp_sub_hash=str(fields.get("idp_sub_hash", "")),
            idp_expires_at=float(fields.get("idp_expires_at", 0.0)),
            idp_tokens=str(fields.get("idp_tokens", "")),
        )
    except (KeyError, ValueError):
        return None


class RedisStorage:
    def __init__(self, url: str, *, key_prefix: str = KEY_PREFIX) -> None:
        self._client = redis.asyncio.Redis(connection_pool=connection_pool(url, decode_responses=True))
        self._prefix = key_prefix
        register = self._client.register_script
        self._save_session = register(SAVE_SESSION)
        self._touch_session = register(TOUCH_SESSION)
        self._delete_session = register(DELETE_SESSION)
        self._delete_user_sessions = register(DELETE_USER_SESSIONS)
        self._delete_indexed_sessions = register(DELETE_INDEXED_SESSIONS)
        self._update_idp_tokens = register(UPDATE_IDP_TOKENS)
        self._acquire_lease = register(ACQUIRE_LEASE)
        self._renew_lease = register(RENEW_LEASE)
        self._count_leases = register(COUNT_LEASES)
        self._lease_holders = register(LEASE_HOLDERS)
        self._incr = register(INCR)
        self._incr_up_to = register(INCR_UP_TO)
        self._add_event = register(ADD_EVENT)
        self._claim_events = register(CLAIM_EVENTS)
        self._retry_event = register(RETRY_EVENT)
        self._delete_event = register(DELETE_EVENT)
        self._outbox = [self.key("events", name) for name in ("due", "body", "attempts", "bytes")]

    @property
    def client(self) -> redis.asyncio.Redis:
        """The client itself, for tracing to instrument (proxy/tracing/)."""
        return self._client

    # Sessions

    async def get_session(self, key: str) -> SessionRecord | None:
        with reachable():
            fields = await self._client.hgetall(self.key("session", key))
        record = session_record(key, fields)
        # Redis expires the key on its own clock; this replica's clock decides too, as with memory.
        return record if record is not None and record.expires_at > time.time() else None

    async def save_session(self, record: SessionRecord) -> None:
        keys = [self.key("session", record.key), self.key("user", record.user_id)]
        keys += [self.key(*index.split(":", 1)) for index in record.indexes()]
        # Floats as `repr`, which round-trips exactly; the expiry also in milliseconds, for PEXPIREAT.
        fields: dict[str, str] = {
            "user_id": record.user_id,
            "kind": record.kind,
            "created_at": repr(record.created_at),
            "last_seen": repr(record.last_seen),
            "expires_at": repr(record.expires_at),
        }
        for name in OPTIONAL_FIELDS:  # only when set: records of other sign-ins stay as they were
            value = getattr(record, name)
            if value:
                fields[name] = repr(value) if isinstance(value, float) else value
        values: list[str | int] = [math.ceil(record.expires_at * 1000), record.key]
        for item in fields.items():
            values.extend(item)
        with reachable():
            await self._save_session(keys, values)

    async def touch_session(self, key: str, last_seen: float) -> bool:
        with reachable():
            return bool(await self._touch_session([self.key("session", key)], [repr(last_seen)]))

    async def delete_session(self, key: str) -> None:
        with reachable():
            await self._delete_session([self.key("session", key)], [self.key("user", ""), key])

    async def delete_user_sessions(self, user_id: str) -> list[str]:
        with reachable():
            removed = await self._delete_user_sessions([self.key("user", user_id)], [self.key("session", "")])
        return sorted(str(member) for member in removed)

    async def delete_indexed_sessions(self, index: str) -> list[tuple[str, str]]:
        kind, name = index.split(":", 1)
        with reachable():
            removed = await self._delete_indexed_sessions(
                [self.key(kind, name)], [self.key("session", ""), self.key("user", "")]
            )
        pairs = [(str(removed[i]), str(removed[i + 1])) for i in range(0, len(removed), 2)]
        return sorted(pairs)

    async def update_idp_tokens(self, key: str, sealed: str, expires_at: float) -> bool:
        with reachable():
            return bool(await self._update_idp_tokens([self.key("session", key)], [sealed, repr(expires_at)]))

    async def user_sessions(self, user_id: str) -> list[SessionRecord]:
        with reachable():
            keys = await self._client.zrange(self.key("user", user_id), 0, -1)
        found = [await self.get_session(str(key)) for key in keys]
        return sorted((record for record in found if record is not None), key=lambda r: r.created_at)

    # Leases

    async def acquire_lease(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        with reachable():
            taken = await self._acquire_lease([self.key("lease", name)], [holder, limit, milliseconds(ttl)])
        return bool(taken)

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        with reachable():
            return bool(await self._renew_lease([self.key("lease", name)], [holder, milliseconds(ttl)]))

    async def release_lease(self, name: str, holder: str) -> None:
        with reachable():
            await self._client.zrem(self.key("lease", name), holder)

    async def count_leases(self, name: str) -> int:
        with reachable():
            return int(await self._count_leases([self.key("lease", name)]))

    async def lease_holders(self, name: str) -> list[str]:
        with reachable():
            holders = await self._lease_holders([self.key("lease", name)])
        return [str(holder) for holder in holders]

    # Counters

    async def incr(self, key: str, amount: int, ttl: float, ranking: Ranking | None = None) -> int:
        keys, values = self._counter_args(key, [amount, milliseconds(ttl)], ranking)
        with reachable():
            return int(await self._incr(keys, values))

    async def incr_up_to(
        self, key: str, amount: int, limit: int, ttl: float, ranking: Ranking | None = None
    ) -> int | None:
        keys, values = self._counter_args(key, [amount, limit, milliseconds(ttl)], ranking)
        with reachable():
            value = int(await self._incr_up_to(keys, values))
        return None if value < 0 else value

    async def get_counter(self, key: str) -> int:
        with reachable():
            value = await self._client.get(self.key("counter", key))
        return int(value) if value is not None else 0

    async def top_ranked(self, name: str, count: int) -> list[tuple[str, int]]:
        if count <= 0:
            return []
        with reachable():
            found = await self._client.zrevrange(self.key("ranking", name), 0, count - 1, withscores=True)
        return [(str(pair[0]), int(pair[1])) for pair in found]

    def _counter_args(
        self, key: str, values: list[str | int], ranking: Ranking | None
    ) -> tuple[list[str], list[str | int]]:
        """A counter script's keys and arguments: the ranking's key and member at the end, if any."""
        keys = [self.key("counter", key)]
        if ranking is None:
            return keys, values
        return [*keys, self.key("ranking", ranking.name)], [*values, ranking.member]

    # Outbox

    async def add_event(self, event_id: str, body: str, limit: int, max_bytes: int) -> bool:
        with reachable():
            return bool(await self._add_event(self._outbox, [event_id, body, limit, max_bytes]))

    async def claim_events(self, count: int, lease: float) -> list[PendingEvent]:
        with reachable():
            found = await self._claim_events(self._outbox, [count, milliseconds(lease)])
        return [PendingEvent(str(found[i]), str(found[i + 1]), int(found[i + 2])) for i in range(0, len(found), 3)]

    async def retry_event(self, event_id: str, delay: float) -> None:
        with reachable():
            await self._retry_event(self._outbox, [event_id, max(0, math.ceil(delay * 1000))])

    async def delete_event(self, event_id: str) -> None:
        with reachable():
            await self._delete_event(self._outbox, [event_id])

    async def count_events(self) -> int:
        with reachable():
            return int(await self._client.zcard(self._outbox[0]))

    # Lifecycle

    async def ping(self) -> None:
        with reachable():
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def key(self, kind: str, name: str) -> str:
        """The Redis key of `name`, one of `kind` (session, lease, counter, ...)."""
        return f"{self._prefix}{kind}:{name}"
