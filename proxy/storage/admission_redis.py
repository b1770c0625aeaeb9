"""A relay's admission in one Redis round trip: one Lua script reads the session and, when nothing in
it needs Python's judgement, touches it when due and runs the admission checks in their documented
order (proxy/runs/manager.py): the output budget (read only), the stream slot, then every rate limit.

What needs Python is left to it: a record past its absolute or idle end (revoked with its audit
line), one whose identity-provider tokens are due for a refresh, or one not written by us. The script
then takes nothing and answers "python", and the caller goes the long way (`SessionManager.require`,
then `RunManager._admit`); so does memory storage, where there are no round trips to save.

Everything the script writes or reads is what the step-by-step path writes and reads: the session
hash of `RedisStorage`, its lease and counter keys, and the rate limits' moving windows exactly as
`limits`' Redis storage keeps them (a list per limit of hit timestamps, newest first, under
`bff-limits:<RateLimitItem.key_for(...)>`; the code below follows its `acquire_moving_window.lua` and
`moving_window.lua`, with the client's `time.time()` as the timestamp as `limits` takes it). So
`GET /api/usage`, the login throttle, and replicas still taking the long way all agree with it.

Keys that depend on whom the request is counted against (the user, or a guest's IP) are only known
once the session is read, so they are passed as the text around that key (`Around`) and completed in
the script: like the other scripts here, this rules out Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from limits.util import WindowStats

from proxy.storage.base import SessionRecord
from proxy.storage.redis import RedisStorage, reachable, session_record

# Stands for the limit key while a key is built around it: no key of ours contains it.
PLACEHOLDER = "\0"

ADMIT = """
-- KEYS: session. ARGV: now, idle seconds, touch after seconds, refresh margin ('' without refresher),
-- a guest's limit key ('' unless guests share their IP's), daily chars (0: no budget), counter key
-- before, after; lease key before, after, holder, cap, ttl ms; limits: how many, then for each
-- key before, after, amount, expiry seconds.
-- Answers {outcome} for 'none' and 'python', else {outcome, limit key, record fields, windows}: the
-- moving window (oldest hit, hits) of each limit once counted ('admitted'), or of the one that
-- refused (index, window: 'rate').
local now = tonumber(ARGV[1])
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {'none'} end
local record = {}
for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end

-- A number as Python's float() reads what RedisStorage writes (repr), or nil: anything else is
-- judged by Python.
local function number(text)
  if text and (string.match(text, '^%-?%d+%.?%d*$') or string.match(text, '^%-?%d+%.?%d*e[-+]%d+$')) then
    return tonumber(text)
  end
  return nil
end
local last_seen, expires_at = number(record.last_seen), number(record.expires_at)
local idp_expires_at = 0
if record.idp_expires_at then idp_expires_at = number(record.idp_expires_at) end
if not (record.user_id and record.kind and number(record.created_at) and last_seen and expires_at
        and idp_expires_at) then
  return {'python'}
end
-- SessionManager.current: ended (absolute, then idle), or its IdP tokens due for a refresh.
if now >= expires_at or now >= last_seen + tonumber(ARGV[2]) then return {'python'} end
if ARGV[4] ~= '' and idp_expires_at ~= 0 and now >= idp_expires_at - tonumber(ARGV[4]) then
  return {'python'}
end
if now - last_seen >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
  for i = 1, #fields, 2 do
    if fields[i] == 'last_seen' then fields[i + 1] = ARGV[1] end
  end
end
-- SessionManager._limit_key: a guest counts against their IP when guests share it.
local key = record.user_id
if record.kind == 'guest' and ARGV[5] ~= '' then key = ARGV[5] end

-- 1. The output budget, read only.
local daily = tonumber(ARGV[6])
if daily > 0 and tonumber(redis.call('GET', ARGV[7] .. key .. ARGV[8]) or '0') >= daily then
  return {'budget', key, fields}
end

-- 2. A stream slot: free? As ACQUIRE_LEASE, but taken only once the rate limits allow, so a request
-- the rate refuses keeps none.
local lease = ARGV[9] .. key .. ARGV[10]
local holder, cap, ttl = ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])
local t = redis.call('TIME')
local ms = t[1] * 1000 + math.floor(t[2] / 1000)
-- Read only (the lapsed leases are dropped once the slot is taken): a script's first write decides
-- whether a full Redis (maxmemory, noeviction) refuses it, and a ZREMRANGEBYSCORE first would let
-- every write after it through; the first write must be one that could grow memory.
local mine = tonumber(redis.call('ZSCORE', lease, holder) or '0')
if mine <= ms and redis.call('ZCOUNT', lease, '(' .. ms, '+inf') >= cap then
  return {'slot', key, fields}
end

-- 3. The rate limits, as limits' moving_window.lua and acquire_moving_window.lua keep them.
local limits = {}
for i = 1, tonumber(ARGV[14]) do
  local at = 14 + (i - 1) * 4
  limits[i] = {ARGV[at + 1] .. key .. ARGV[at + 2], tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])}
end
local function window(limit)
  local name, amount, expiry = limit[1], limit[2], limit[3]
  local target = now - expiry
  local low, high, found = 0, amount - 1, nil
  while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('LINDEX', name, mid))
    if value and value >= target then
      found = mid
      low = mid + 1
    else
      high = mid - 1
    end
  end
  if not found then return {ARGV[1], 0} end
  return {tostring(tonumber(redis.call('LINDEX', name, found))), found + 1}
end
local function hit(limit)
  local name, amount, expiry = limit[1], limit[2], limit[3]
  local entry = redis.call('LINDEX', name, amount - 1)
  if entry and tonumber(entry) >= now - expiry then return false end
  redis.call('LPUSH', name, now)
  redis.call('LTRIM', name, 0, amount - 1)
  redis.call('EXPIRE', name, expiry)
  return true
end
-- RateLimiter.check: test every limit before counting against any (one alone needs no test).
if #limits > 1 then
  for i, limit in ipairs(limits) do
    local seen = window(limit)
    if seen[2] > limit[2] - 1 then return {'rate', key, fields, {i, seen}} end
  end
end
local windows = {}
for i, limit in ipairs(limits) do
  if not hit(limit) then return {'rate', key, fields, {i, window(limit)}} end
  windows[i] = window(limit)
end

redis.call('ZADD', lease, ms + ttl, holder)
redis.call('ZREMRANGEBYSCORE', lease, '-inf', ms)
local last = redis.call('ZRANGE', lease, -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', lease, last[2]) end
return {'admitted', key, fields, windows}
"""


@dataclass(frozen=True)
class Around:
    """A key with the limit key still to go in between `before` and `after`."""

    before: str
    after: str

    @classmethod
    def of(cls, name_of: Callable[[str], str]) -> Around:
        """The key `name_of` builds, with the limit key left out: built by the same function as on the
        step-by-step path, so the two cannot drift apart."""
        before, *rest = name_of(PLACEHOLDER).split(PLACEHOLDER)
        if len(rest) != 1:
            raise ValueError("a key holds the limit key exactly once")
        return cls(before, rest[0])


@dataclass(frozen=True)
class WindowAsk:
    """One moving-window limit to count the request against, as `limits` keys it."""

    key: Around  # RateLimitItem.key_for(namespace, scope, <limit key>), without the storage's prefix
    amount: int
    expiry: int  # seconds


@dataclass(frozen=True)
class AdmissionAsk:
    session_key: str
    now: float  # time.time(): the session's clocks and the windows' timestamps, as on the long way
    idle_seconds: float
    touch_after: float
    refresh_margin: float | None  # None: no IdP refresher
    guest_key: str | None  # the limit key of a guest, when guests share their IP's limits
    daily_chars: int  # 0: no budget
    counter: Around
    lease: Around
    holder: str
    cap: int
    lease_ms: int
    windows: Sequence[WindowAsk]


@dataclass(frozen=True)
class AdmissionAnswer:
    # "none" (no session), "python" (take the long way), "budget", "slot", "rate" or "admitted"
    outcome: str
    limit_key: str = ""
    record: SessionRecord | None = None
    # "admitted": each limit's window after its count, in the order asked; "rate": the refusing one's
    windows: tuple[WindowStats, ...] = ()
    refused_by: int = -1  # "rate": the index of the limit that refused


class RedisAdmission:
    def __init__(self, storage: RedisStorage, limits_prefix: str) -> None:
        self._storage = storage
        self._limits_prefix = limits_prefix
        self._admit = storage.client.register_script(ADMIT)

    async def admit(self, ask: AdmissionAsk) -> AdmissionAnswer:
        key = self._storage.key
        values: list[str | int | float] = [
            repr(ask.now),
            repr(float(ask.idle_seconds)),
            repr(float(ask.touch_after)),
            "" if ask.refresh_margin is None else repr(float(ask.refresh_margin)),
            ask.guest_key or "",
            ask.daily_chars,
            key("counter", ask.counter.before),
            ask.counter.after,
            key("lease", ask.lease.before),
            ask.lease.after,
            ask.holder,
            ask.cap,
            ask.lease_ms,
            len(ask.windows),
        ]
        for limit in ask.windows:
            values += [f"{self._limits_prefix}:{limit.key.before}", limit.key.after, limit.amount, limit.expiry]
        with reachable():
            answer = await self._admit([key("session", ask.session_key)], values)
        outcome = str(answer[0])
        if outcome in ("none", "python"):
            return AdmissionAnswer(outcome)
        limit_key, flat = str(answer[1]), answer[2]
        record = session_record(ask.session_key, {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)})
        if record is None:  # pragma: no cover - the script read it as ours
            return AdmissionAnswer("python")
        if outcome == "rate":
            index, window = int(answer[3][0]) - 1, answer[3][1]
            return AdmissionAnswer(outcome, limit_key, record, (_stats(window, ask.windows[index]),), index)
        if outcome == "admitted":
            stats = tuple(_stats(window, limit) for window, limit in zip(answer[3], ask.windows, strict=True))
            return AdmissionAnswer(outcome, limit_key, record, stats)
        return AdmissionAnswer(outcome, limit_key, record)


def _stats(window: Sequence[object], limit: WindowAsk) -> WindowStats:
    """A window's stats as `limits`' MovingWindowRateLimiter.get_window_stats makes them of its oldest
    hit and number of hits."""
    return WindowStats(float(str(window[0])) + limit.expiry, limit.amount - int(str(window[1])))
