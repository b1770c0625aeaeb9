"""The storage contract: one suite, run against memory and against Redis on a real `redis-server`.

`replicas` gives two handles on one store: the same object for memory (one process), two separate
clients of one Redis for Redis, so every "across replicas" claim is checked where it can hold.
Real proxy processes sharing one Redis are in tests/test_replicas.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import limits
import limits.errors
import pytest
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.cli import ConfigError, load_settings
from proxy.storage import (
    MemoryStorage,
    PendingEvent,
    Ranking,
    RedisStorage,
    SessionRecord,
    Storage,
    StorageUnavailable,
    open_limits_storage,
    open_storage,
)
from proxy.storage.limits_memory import SWEEP_SECONDS, MovingWindowMemory
from tests.conftest import start_redis
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

EVENTUALLY_SECONDS = 10.0
MiB = 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Storage, Storage]]:
    if request.param == "memory":
        memory = MemoryStorage()
        yield memory, memory
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex}:"  # each test its own keys, so tests never see each other's state
    first, second = RedisStorage(server.url, key_prefix=prefix), RedisStorage(server.url, key_prefix=prefix)
    yield first, second
    await first.close()
    await second.close()


@pytest.fixture
def storage(replicas: tuple[Storage, Storage]) -> Storage:
    return replicas[0]


def record(key: str = "k1", user_id: str = "u1", *, lifetime: float = 3600.0) -> SessionRecord:
    now = time.time()
    return SessionRecord(key, user_id, "guest", created_at=now, last_seen=now, expires_at=now + lifetime)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for something that must happen on its own (an expiry); fail if it has not within a bound."""
    deadline = time.monotonic() + EVENTUALLY_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await anyio.sleep(0.02)


# Sessions


async def test_a_saved_session_reads_back_exactly_on_every_replica(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    saved = record()

    await first.save_session(saved)

    assert await first.get_session("k1") == saved
    assert await second.get_session("k1") == saved
    assert await second.get_session("other") is None


async def test_saving_again_replaces_the_record(storage: Storage) -> None:
    await storage.save_session(record())
    replacement = SessionRecord("k1", "u1", "guest", created_at=1.0, last_seen=2.0, expires_at=time.time() + 60)

    await storage.save_session(replacement)

    assert await storage.get_session("k1") == replacement


async def test_a_session_is_gone_at_its_absolute_expiry(storage: Storage) -> None:
    await storage.save_session(record("over", lifetime=-1.0))
    await storage.save_session(record("short", lifetime=0.2))
    await storage.save_session(record("long"))

    assert await storage.get_session("over") is None
    await eventually(lambda: is_none(storage.get_session("short")), "a session outliving its expires_at")
    assert await storage.get_session("long") is not None
    assert await storage.delete_user_sessions("u1") == ["long"]


async def is_none(lookup: Awaitable[SessionRecord | None]) -> bool:
    return await lookup is None


async def test_touch_moves_last_seen_and_nothing_else(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    saved = record()
    await first.save_session(saved)

    assert await second.touch_session("k1", saved.last_seen + 42.5) is True

    assert await first.get_session("k1") == SessionRecord(
        "k1", "u1", "guest", saved.created_at, saved.last_seen + 42.5, saved.expires_at
    )


async def test_a_touch_never_brings_back_an_ended_session(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.save_session(record())
    await first.delete_session("k1")

    assert await second.touch_session("k1", time.time()) is False
    assert await second.get_session("k1") is None


async def test_deleting_a_session_on_one_replica_ends_it_on_the_other(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.save_session(record("k1"))
    await first.save_session(record("k2"))

    await second.delete_session("k1")
    await second.delete_session("never-existed")

    assert await first.get_session("k1") is None
    assert await first.get_session("k2") is not None
    assert await first.delete_user_sessions("u1") == ["k2"]


async def test_logout_all_ends_every_session_of_the_user_and_no_other(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    for key, user in (("a2", "alice"), ("a1", "alice"), ("b1", "bob")):
        await first.save_session(record(key, user))

    assert await second.delete_user_sessions("alice") == ["a1", "a2"]

    assert await first.get_session("a1") is None
    assert await first.get_session("a2") is None
    assert await first.get_session("b1") is not None
    assert await first.delete_user_sessions("alice") == []
    assert await first.delete_user_sessions("nobody") == []


async def test_a_users_live_sessions_are_listed_oldest_first_on_every_replica(
    replicas: tuple[Storage, Storage],
) -> None:
    first, second = replicas
    await first.save_session(record("a1", "alice"))
    await first.save_session(record("b1", "bob"))
    await first.save_session(record("a2", "alice"))
    await first.save_session(record("gone", "alice", lifetime=-1))

    assert [r.key for r in await second.user_sessions("alice")] == ["a1", "a2"]
    assert await second.user_sessions("nobody") == []


def oidc_record(key: str, user_id: str = "oidc:alice", *, sid: str = "sid1", sub: str = "sub1") -> SessionRecord:
    now = time.time()
    return SessionRecord(
        key,
        user_id,
        "oidc",
        created_at=now,
        last_seen=now,
        expires_at=now + 3600,
        display_name="Alice",
        idp_sid_hash=sid,
        idp_sub_hash=sub,
        idp_expires_at=now + 30,
        idp_tokens="v1.abcd.sealed",
    )


async def test_an_oidc_session_reads_back_exactly_with_its_idp_fields(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    saved = oidc_record("o1")

    await first.save_session(saved)

    assert await second.get_session("o1") == saved


async def test_idp_tokens_are_replaced_only_in_a_live_session(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.save_session(oidc_record("o1"))

    assert await second.update_idp_tokens("o1", "v1.abcd.new", 1234.5)
    assert not await second.update_idp_tokens("ended", "v1.abcd.new", 1234.5)

    updated = await first.get_session("o1")
    assert updated is not None and (updated.idp_tokens, updated.idp_expires_at) == ("v1.abcd.new", 1234.5)
    assert await first.get_session("ended") is None


async def test_back_channel_indexes_end_the_sessions_of_one_idp_session_or_subject(
    replicas: tuple[Storage, Storage],
) -> None:
    first, second = replicas
    await first.save_session(oidc_record("o1", sid="s1", sub="alice"))
    await first.save_session(oidc_record("o2", sid="s2", sub="alice"))
    await first.save_session(oidc_record("o3", "oidc:bob", sid="s3", sub="bob"))
    await first.save_session(record("g1", "oidc:alice"))  # no IdP fields: in no index

    assert await second.delete_indexed_sessions("oidc-sid:s1") == [("o1", "oidc:alice")]
    assert await first.get_session("o1") is None and await first.get_session("o2") is not None
    assert await second.delete_indexed_sessions("oidc-sub:alice") == [("o2", "oidc:alice")]
    assert await second.delete_indexed_sessions("oidc-sub:alice") == []
    assert await first.get_session("o3") is not None and await first.get_session("g1") is not None
    assert [r.key for r in await second.user_sessions("oidc:alice")] == ["g1"]


# Leases


async def test_a_lease_pool_admits_at_most_its_limit_across_replicas(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas

    taken = [await (first, second)[n % 2].acquire_lease("streams:u1", f"s{n}", 3, 60) for n in range(5)]

    assert taken == [True, True, True, False, False]
    assert await first.count_leases("streams:u1") == 3
    assert await second.count_leases("streams:u1") == 3


async def test_concurrent_acquires_never_exceed_the_limit(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    results: list[bool] = []

    async def acquire(replica: Storage, holder: str) -> None:
        results.append(await replica.acquire_lease("streams:u1", holder, 3, 60))

    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(acquire, (first, second)[n % 2], f"s{n}")

    assert sorted(results) == [False] * 17 + [True] * 3
    assert await first.count_leases("streams:u1") == 3


async def test_acquiring_again_keeps_one_place(storage: Storage) -> None:
    assert await storage.acquire_lease("streams:u1", "s1", 2, 60)
    assert await storage.acquire_lease("streams:u1", "s1", 2, 60)

    assert await storage.count_leases("streams:u1") == 1
    assert await storage.acquire_lease("streams:u1", "s2", 2, 60)


async def test_a_released_lease_frees_its_place_on_every_replica(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.acquire_lease("streams:u1", "s1", 1, 60)

    await second.release_lease("streams:u1", "s1")
    await second.release_lease("streams:u1", "never-held")
    await second.release_lease("no-such-pool", "s1")

    assert await first.count_leases("streams:u1") == 0
    assert await first.acquire_lease("streams:u1", "s2", 1, 60)


async def test_a_lapsed_lease_frees_its_place_without_a_release(storage: Storage) -> None:
    """What happens to the stream slots of a replica that crashed mid-stream."""
    assert await storage.acquire_lease("streams:u1", "crashed", 1, 0.2)
    assert await storage.acquire_lease("streams:u1", "alive", 2, 60)

    await eventually(lambda: has_count(storage, "streams:u1", 1), "the crashed holder's lease lapsing")
    assert await storage.acquire_lease("streams:u1", "next", 2, 60)
    assert await storage.renew_lease("streams:u1", "crashed", 60) is False


async def has_count(storage: Storage, name: str, count: int) -> bool:
    return await storage.count_leases(name) == count


async def test_renewing_keeps_a_held_lease_and_refuses_a_released_one(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.acquire_lease("streams:u1", "s1", 1, 60)

    assert await second.renew_lease("streams:u1", "s1", 120) is True
    assert await second.renew_lease("streams:u1", "stranger", 120) is False
    assert await first.count_leases("streams:u1") == 1  # a failed renew takes no place

    await first.release_lease("streams:u1", "s1")
    assert await second.renew_lease("streams:u1", "s1", 120) is False


async def test_lease_holders_are_the_live_ones_on_every_replica(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    assert await first.acquire_lease("streams:u1", "run_a", 3, 60)
    assert await second.acquire_lease("streams:u1", "run_b", 3, 60)
    assert await first.acquire_lease("streams:u1", "run_c", 3, 0.2)
    await second.release_lease("streams:u1", "run_b")

    await eventually(lambda: holders_are(second, "streams:u1", ["run_a"]), "the short lease lapsing")
    assert await first.lease_holders("streams:u2") == []


async def holders_are(storage: Storage, name: str, expected: list[str]) -> bool:
    return sorted(await storage.lease_holders(name)) == expected


async def test_lease_pools_are_independent(storage: Storage) -> None:
    assert await storage.acquire_lease("streams:u1", "s", 1, 60)
    assert await storage.acquire_lease("streams:u2", "s", 1, 60)
    assert await storage.count_leases("streams:u3") == 0


# Counters


async def test_counters_add_exactly_across_replicas(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas

    async def charge(replica: Storage) -> None:
        await replica.incr("output:u1", 7, 3600)

    async with anyio.create_task_group() as group:
        for n in range(30):
            group.start_soon(charge, (first, second)[n % 2])

    assert await first.get_counter("output:u1") == 210
    assert await second.incr("output:u1", -10, 3600) == 200  # a refund
    assert await first.get_counter("output:u2") == 0


async def test_a_bounded_increment_adds_only_what_fits_even_when_replicas_race(
    replicas: tuple[Storage, Storage],
) -> None:
    first, second = replicas
    added: list[int | None] = []

    async def charge(replica: Storage) -> None:
        added.append(await replica.incr_up_to("output:u3", 30, 100, 3600))

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(charge, (first, second)[n % 2])

    assert sorted(value for value in added if value is not None) == [30, 60, 90]  # only three fit
    assert added.count(None) == 7
    assert await first.get_counter("output:u3") == 90
    assert await second.incr_up_to("output:u3", 10, 100, 3600) == 100  # up to the limit itself


async def test_a_counter_expires_its_ttl_after_creation_not_after_each_increment(storage: Storage) -> None:
    assert await storage.incr("budget:u1", 5, 0.5) == 5
    assert await storage.incr("budget:u1", 5, 3600) == 10  # does not push the expiry back

    await eventually(lambda: counter_is(storage, "budget:u1", 0), "the counter expiring")
    assert await storage.incr("budget:u1", 1, 3600) == 1


async def counter_is(storage: Storage, key: str, value: int) -> bool:
    return await storage.get_counter(key) == value


async def test_a_ranked_increment_adds_to_the_counter_and_the_ranking_alike_across_replicas(
    replicas: tuple[Storage, Storage],
) -> None:
    first, second = replicas

    async def charge(replica: Storage, user: str, amount: int) -> None:
        await replica.incr(f"output:{user}:day1", amount, 3600, Ranking("output:day1", user))

    async with anyio.create_task_group() as group:
        for n in range(30):
            group.start_soon(charge, (first, second)[n % 2], ("ann", "bob", "cy")[n % 3], 10 + n % 3)

    assert [await first.get_counter(f"output:{user}:day1") for user in ("ann", "bob", "cy")] == [100, 110, 120]
    assert await second.top_ranked("output:day1", 10) == [("cy", 120), ("bob", 110), ("ann", 100)]
    assert await first.top_ranked("output:day1", 2) == [("cy", 120), ("bob", 110)]
    assert await first.top_ranked("output:day2", 10) == []  # another day's ranking


async def test_a_bounded_increment_ranks_only_what_it_added(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    ranking = Ranking("output:day1", "ann")
    assert await first.incr_up_to("output:ann", 60, 100, 3600, ranking) == 60
    assert await second.incr_up_to("output:ann", 60, 100, 3600, ranking) is None
    assert await second.incr("output:bob", 60, 3600, Ranking("output:day1", "bob")) == 60

    # Equal totals: members in reverse order, as Redis's ZREVRANGE gives them.
    assert await first.top_ranked("output:day1", 10) == [("bob", 60), ("ann", 60)]


async def test_a_ranking_expires_its_ttl_after_creation_like_its_counters(storage: Storage) -> None:
    await storage.incr("output:ann", 5, 0.5, Ranking("output:day1", "ann"))
    await storage.incr("output:bob", 5, 3600, Ranking("output:day1", "bob"))  # does not push the expiry back

    await eventually(lambda: ranking_is(storage, "output:day1", []), "the ranking expiring")
    await storage.incr("output:cy", 1, 3600, Ranking("output:day1", "cy"))
    assert await storage.top_ranked("output:day1", 10) == [("cy", 1)]


async def ranking_is(storage: Storage, name: str, expected: list[tuple[str, int]]) -> bool:
    return await storage.top_ranked(name, 10) == expected


async def test_ping_answers_while_the_backend_is_up(storage: Storage) -> None:
    await storage.ping()


# Outbox


async def test_an_added_event_is_claimed_once_across_replicas_with_its_body_and_attempt(
    replicas: tuple[Storage, Storage],
) -> None:
    first, second = replicas
    assert await first.add_event("evt_1", '{"n": 1}', limit=10, max_bytes=MiB) is True

    claims = [await second.claim_events(5, lease=60.0), await first.claim_events(5, lease=60.0)]

    assert claims == [[PendingEvent("evt_1", '{"n": 1}', 1)], []]
    assert await first.count_events() == 1  # claimed, not gone: only a delete removes it


async def test_concurrent_claims_hand_each_event_to_one_claimer(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    for n in range(20):
        await first.add_event(f"evt_{n}", str(n), limit=100, max_bytes=MiB)
    claimed: list[PendingEvent] = []

    async def claim(storage: Storage) -> None:
        claimed.extend(await storage.claim_events(3, lease=60.0))

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(claim, (first, second)[n % 2])

    assert sorted(event.event_id for event in claimed) == sorted(f"evt_{n}" for n in range(20))


async def test_a_retried_event_is_due_again_after_its_delay_with_one_attempt_more(storage: Storage) -> None:
    await storage.add_event("evt_1", "body", limit=10, max_bytes=MiB)
    await storage.claim_events(1, lease=60.0)

    await storage.retry_event("evt_1", 0.2)

    assert await storage.claim_events(1, lease=60.0) == []
    found: list[PendingEvent] = []

    async def claimed() -> bool:
        found.extend(await storage.claim_events(1, lease=60.0))
        return bool(found)

    await eventually(claimed, "a retried event falling due")
    assert found == [PendingEvent("evt_1", "body", 2)]


async def test_a_claim_whose_lease_lapsed_is_due_again(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.add_event("evt_1", "body", limit=10, max_bytes=MiB)
    assert len(await first.claim_events(1, lease=0.2)) == 1  # and the claimer died

    async def claimed() -> bool:
        return bool(await second.claim_events(1, lease=60.0))

    await eventually(claimed, "a lapsed claim freeing its event")


async def test_a_deleted_event_is_never_claimed_again(replicas: tuple[Storage, Storage]) -> None:
    first, second = replicas
    await first.add_event("evt_1", "body", limit=10, max_bytes=MiB)
    await first.claim_events(1, lease=0.0)

    await second.delete_event("evt_1")
    await second.retry_event("evt_1", 0.0)  # a late retry does not bring it back

    assert await first.claim_events(1, lease=60.0) == []
    assert await first.count_events() == 0


async def test_the_outbox_refuses_events_beyond_its_limit_and_never_adds_one_twice(storage: Storage) -> None:
    assert await storage.add_event("evt_1", "one", limit=2, max_bytes=MiB) is True
    assert await storage.add_event("evt_1", "again", limit=2, max_bytes=MiB) is True
    assert await storage.add_event("evt_2", "two", limit=2, max_bytes=MiB) is True

    assert await storage.add_event("evt_3", "three", limit=2, max_bytes=MiB) is False

    claimed = await storage.claim_events(10, lease=60.0)
    assert [(event.event_id, event.body) for event in claimed] == [("evt_1", "one"), ("evt_2", "two")]


async def test_the_outbox_refuses_an_event_its_byte_bound_has_no_room_for(storage: Storage) -> None:
    answer = "答" * 100  # 300 bytes in UTF-8
    assert await storage.add_event("evt_1", answer, limit=10, max_bytes=700) is True
    assert await storage.add_event("evt_2", answer, limit=10, max_bytes=700) is True
    assert await storage.add_event("evt_3", answer, limit=10, max_bytes=700) is False  # 900 > 700

    await storage.delete_event("evt_1")  # its bytes are free again
    assert await storage.add_event("evt_3", answer, limit=10, max_bytes=700) is True
    assert {event.event_id for event in await storage.claim_events(10, lease=60.0)} == {"evt_2", "evt_3"}


async def test_only_due_events_are_claimed(storage: Storage) -> None:
    for n in range(3):
        await storage.add_event(f"evt_{n}", str(n), limit=10, max_bytes=MiB)
    await storage.claim_events(3, lease=60.0)
    await storage.retry_event("evt_0", 60.0)
    await storage.retry_event("evt_2", 0.0)

    claimed = await storage.claim_events(3, lease=60.0)

    assert [event.event_id for event in claimed] == ["evt_2"]


async def test_an_emptied_outbox_weighs_nothing_whatever_made_its_total_drift(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    storage = RedisStorage(redis_server.url, key_prefix=prefix)
    try:
        await storage.add_event("evt_1", "x" * 600, limit=10, max_bytes=1000)
        # A total that drifted (the keys deleted by hand, an outbox from before the total was kept):
        await storage.client.incrby(f"{prefix}events:bytes", 1000)
        assert await storage.add_event("evt_2", "x" * 100, limit=10, max_bytes=1000) is False

        await storage.delete_event("evt_1")  # the outbox is empty: its total starts again from 0
        assert await storage.add_event("evt_2", "x" * 900, limit=10, max_bytes=1000) is True
    finally:
        await storage.close()


async def test_a_full_redis_is_a_storage_that_takes_no_writes_now(redis_server: RedisServer) -> None:
    storage = RedisStorage(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    client = storage.client
    limit = await client.config_get("maxmemory")
    try:
        await client.config_set("maxmemory", int((await client.info("memory"))["used_memory"]) + 50_000)
        await client.eval("for i = 1, 2000 do redis.call('SET', KEYS[1] .. i, string.rep('x', 100)) end", 1, "fill:")
        # An output count is deferred (OutputBudget keeps it for later), not lost as an unknown error.
        with pytest.raises(StorageUnavailable):
            await storage.incr("output:u1", 70_000, 3600)
    finally:
        await client.config_set("maxmemory", limit["maxmemory"])
        await client.eval("for i = 1, 2000 do redis.call('DEL', KEYS[1] .. i) end", 1, "fill:")
        await storage.close()


# Redis going away and coming back


async def test_redis_down_raises_storage_unavailable_then_recovers_with_nothing_lost(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    storage = RedisStorage(server.url)
    kept = record("kept")
    try:
        await storage.save_session(kept)
        await storage.acquire_lease("streams:u1", "s1", 1, 600)
        await storage.incr("output:u1", 11, 3600)

        server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            storage.ping,
            lambda: storage.get_session("kept"),
            lambda: storage.save_session(record("new")),
            lambda: storage.delete_user_sessions("u1"),
            lambda: storage.acquire_lease("streams:u1", "s2", 1, 60),
            lambda: storage.incr("output:u1", 1, 3600),
        ]
        for call in calls:
            with pytest.raises(StorageUnavailable) as raised:
                await call()
            assert (raised.value.status, raised.value.code) == (503, "storage_unavailable")
            assert raised.value.headers["Retry-After"].isdigit()

        server.start()  # same port, same data directory
        await storage.ping()
        assert await storage.get_session("kept") == kept
        assert await storage.acquire_lease("streams:u1", "s2", 1, 60) is False  # s1's lease survived
        assert await storage.get_counter("output:u1") == 11
    finally:
        await storage.close()
        server.stop()


# Choosing a backend, and the rate limiter's storage


def test_the_storage_url_picks_the_backend() -> None:
    assert isinstance(open_storage("memory://"), MemoryStorage)
    assert isinstance(open_storage("redis://redis.internal:6379/0"), RedisStorage)
    assert isinstance(open_storage("rediss://:pw@redis.internal:6380/2"), RedisStorage)
    assert isinstance(open_limits_storage("memory://"), MovingWindowMemory)


@pytest.mark.parametrize(
    "url", ["", "memory", "memory://x", "redis://", "redis:///0", "redis+cluster://h:1", "http://h", "mongodb://h"]
)
def test_an_unsupported_storage_url_stops_start_up_naming_the_variable(url: str) -> None:
    with pytest.raises(ConfigError, match="BFF_STORAGE_URL"):
        load_settings(_env_file=None, storage_url=url)


@pytest.fixture(params=["memory", "redis"])
async def limits_storage(request: pytest.FixtureRequest) -> AsyncIterator[limits.aio.storage.Storage]:
    if request.param == "memory":
        yield open_limits_storage("memory://")
    else:
        yield open_limits_storage(request.getfixturevalue("redis_server").url)


async def test_the_rate_limit_window_is_the_same_in_memory_and_in_redis(
    limits_storage: limits.aio.storage.Storage,
) -> None:
    limiter = MovingWindowRateLimiter(limits_storage)
    item, other = limits.parse("3/minute"), limits.parse("1/minute")
    user = f"user-{uuid.uuid4().hex}"
    before = time.time()

    assert [await limiter.hit(item, user) for _ in range(4)] == [True, True, True, False]
    assert not await limiter.test(item, user)
    stats = await limiter.get_window_stats(item, user)
    assert stats.remaining == 0
    assert before + 59 <= stats.reset_time <= time.time() + 61  # when the first hit leaves the window
    assert await limiter.hit(other, user)  # another limit, another window

    await limiter.clear(item, user)
    assert (await limiter.get_window_stats(item, user)).remaining == 3
    assert await limiter.hit(item, user)


async def test_rate_limit_hits_leave_the_window_alike_in_memory_and_in_redis(
    limits_storage: limits.aio.storage.Storage,
) -> None:
    limiter = MovingWindowRateLimiter(limits_storage)
    item = limits.parse("3/second")
    user = f"user-{uuid.uuid4().hex}"

    assert not await limiter.hit(item, user, cost=4)  # more than the limit: never
    assert await limiter.hit(item, user, cost=2)
    assert not await limiter.hit(item, user, cost=2)
    reset_time = (await limiter.get_window_stats(item, user)).reset_time
    await anyio.sleep(max(reset_time - time.time(), 0) + 0.05)  # a time, not an event: the window passing

    assert (await limiter.get_window_stats(item, user)).remaining == 3
    assert await limiter.hit(item, user, cost=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    monotonic = time


async def test_in_memory_rate_limit_entries_leave_with_their_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("proxy.storage.limits_memory.time", clock)
    storage = MovingWindowMemory()

    assert [await storage.acquire_entry("k", 2, 10) for _ in range(3)] == [True, True, False]
    clock.now += 5
    assert not await storage.acquire_entry("k", 2, 10)
    assert await storage.get_moving_window("k", 2, 10) == (1_000_000.0, 2)
    clock.now += 5.001  # the first two entries are out of the window
    assert await storage.get_moving_window("k", 2, 10) == (clock.now, 0)
    assert await storage.acquire_entry("k", 2, 10, amount=2)
    assert not await storage.acquire_entry("other", 2, 10, amount=3)  # more than the limit, ever


async def test_in_memory_rate_limits_hold_when_the_clock_is_set_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("proxy.storage.limits_memory.time", clock)
    storage = MovingWindowMemory()
    assert await storage.acquire_entry("k", 2, 10)
    clock.now -= 50  # e.g. an NTP correction
    assert await storage.acquire_entry("k", 2, 10)
    clock.now += 55  # 5 s after the first entry by the old clock: both still count

    assert not await storage.acquire_entry("k", 2, 10)
    clock.now += SWEEP_SECONDS
    assert await storage.acquire_entry("k", 2, 10)  # the sweep ran, and the window passed


async def test_in_memory_rate_limits_forget_users_who_went_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is kept for a key whose window has passed, once the periodic sweep has run."""
    clock = Clock()
    monkeypatch.setattr("proxy.storage.limits_memory.time", clock)
    storage = MovingWindowMemory()
    for user in range(100):
        assert await storage.acquire_entry(f"gone-{user}", 5, 10)
    clock.now += SWEEP_SECONDS / 2
    assert await storage.acquire_entry("still-here", 5, SWEEP_SECONDS * 2)

    clock.now += SWEEP_SECONDS / 2
    assert await storage.acquire_entry("new", 5, 10)  # runs the sweep

    assert await storage.reset() == 2  # "still-here" and "new"


async def test_rate_limit_counts_are_shared_by_replicas_through_redis(redis_server: RedisServer) -> None:
    """The same `limits` syntax the rate limits use, counted in our Redis by two independent clients."""
    first, second = open_limits_storage(redis_server.url), open_limits_storage(redis_server.url)
    item = limits.parse("3/minute")
    user = f"user-{uuid.uuid4().hex}"

    hits = [await MovingWindowRateLimiter((first, second)[n % 2]).hit(item, user) for n in range(5)]

    assert hits == [True, True, True, False, False]
    assert await first.check()


async def test_rate_limit_storage_errors_while_redis_is_down(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    limiter = MovingWindowRateLimiter(open_limits_storage(server.url))
    item = limits.parse("3/minute")
    assert await limiter.hit(item, "u1")

    try:
        server.stop()
        with pytest.raises(limits.errors.StorageError):
            await limiter.hit(item, "u1")

        server.start()
        assert await limiter.hit(item, "u1")
    finally:
        server.stop()
