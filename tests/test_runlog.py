"""The run log contract: one suite, run against memory and against Redis Streams on a real `redis-server`.

`replicas` gives two handles on one store: the same object for memory (one process), two separate
`RedisRunLogs` for Redis, so the second reads what the first wrote through Redis alone, as a
follower on another replica does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio

from proxy.storage.runlog import END, OPEN, TEXT, Expiring, MemoryRunLogs, RunLogs, RunMeta
from proxy.storage.runlog_redis import RedisRunLogs
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio
WAIT = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RunLogs, RunLogs]]:
    if request.param == "memory":
        memory = MemoryRunLogs()
        yield memory, memory
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex}:"
    first = RedisRunLogs(server.url, key_prefix=prefix, alive_seconds=1.5)
    second = RedisRunLogs(server.url, key_prefix=prefix, alive_seconds=1.5)
    yield first, second
    await first.close()
    await second.close()


def meta(chat_id: str | None = "chat-1", user_id: str = "guest:a") -> RunMeta:
    return RunMeta("run_" + uuid.uuid4().hex, user_id, "msg_1", "tutor", chat_id)


def ending(reason: str = "complete") -> tuple[str, bytes]:
    return (END, json.dumps({"reason": reason}).encode())


async def read_all(logs: RunLogs, run_id: str) -> list[tuple[str, bytes]]:
    """Every entry up to and including `END`, read the way a follower reads: what is there, then more."""
    entries: list[tuple[str, bytes]] = []
    with anyio.fail_after(WAIT):
        while not entries or entries[-1][0] != END:
            entries += await logs.read(run_id, len(entries), None)
    return entries


async def test_what_one_replica_writes_the_other_reads_in_order_to_the_end(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, reader = replicas
    log = await producer.create(meta(), ttl=60)
    written = [(OPEN, b""), (TEXT, b"caf"), (TEXT, "é ✓".encode()), (TEXT, b"\xff raw")]
    for entry in written:
        log.append(entry)
    await log.close(ending(), keep_seconds=60)

    assert await read_all(reader, log.meta.run_id) == [*written, ending()]
    assert await read_all(producer, log.meta.run_id) == [*written, ending()]


async def test_a_waiting_reader_gets_what_is_appended_while_it_waits(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, reader = replicas
    log = await producer.create(meta(), ttl=60)
    log.append((OPEN, b""))
    got: list[list[tuple[str, bytes]]] = []

    async with anyio.create_task_group() as group:

        async def wait_for_text() -> None:
            got.append(await reader.read(log.meta.run_id, 1, WAIT))

        group.start_soon(wait_for_text)
        await anyio.sleep(0.1)  # the reader is blocked by now (if not, it finds the entry at once)
        log.append((TEXT, b"later"))

    assert got == [[(TEXT, b"later")]]
    await log.close(ending(), keep_seconds=60)


async def test_a_reader_that_is_behind_gets_everything_waiting_in_one_read(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, reader = replicas
    log = await producer.create(meta(), ttl=60)
    for n in range(50):
        log.append((TEXT, str(n).encode()))
    await log.close(ending(), keep_seconds=60)

    assert len(await reader.read(log.meta.run_id, 10, WAIT)) == 41  # 40 texts and the end


async def test_a_read_with_nothing_new_returns_nothing_after_its_wait(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, reader = replicas
    log = await producer.create(meta(), ttl=60)
    log.append((OPEN, b""))

    assert await reader.read(log.meta.run_id, 1, 0.2) == []
    await log.close(ending(), keep_seconds=60)


async def test_the_meta_names_the_owner_and_the_chat_points_at_its_latest_run(
    replicas: tuple[RunLogs, RunLogs],
) -> None:
    producer, reader = replicas
    first = await producer.create(meta(), ttl=60)
    await producer.written()  # a run is created with its first write
    assert await reader.meta(first.meta.run_id) == first.meta
    assert await reader.chat_run("guest:a", "tutor", "chat-1") == first.meta.run_id

    second = await producer.create(meta(), ttl=60)
    await first.close(ending("replaced"), keep_seconds=60)  # the writer writes both, in order
    assert await reader.chat_run("guest:a", "tutor", "chat-1") == second.meta.run_id
    # The index is per user and per workflow: the same chat id elsewhere is another chat.
    assert await reader.chat_run("guest:b", "tutor", "chat-1") is None
    assert await reader.chat_run("guest:a", "story", "chat-1") is None
    assert await reader.meta("run_unknown") is None
    await second.close(ending(), keep_seconds=60)


async def test_an_ended_log_is_forgotten_after_its_keep_time(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, reader = replicas
    log = await producer.create(meta(), ttl=60)
    log.append((TEXT, b"hello"))
    await log.close(ending(), keep_seconds=0.3)
    assert await reader.meta(log.meta.run_id) is not None

    with anyio.fail_after(WAIT):
        while await reader.meta(log.meta.run_id) is not None:  # noqa: ASYNC110
            await anyio.sleep(0.05)  # an expiry sends no event to wait for
    assert await reader.chat_run("guest:a", "tutor", "chat-1") is None
    [(kind, value)] = await reader.read(log.meta.run_id, 0, 1.0)
    assert (kind, json.loads(value)["reason"]) == (END, "lost")


async def test_a_control_message_reaches_the_replica_that_listens(replicas: tuple[RunLogs, RunLogs]) -> None:
    producer, other = replicas
    received: list[tuple[str, str]] = []
    arrived = anyio.Event()

    def handler(kind: str, run_id: str) -> None:
        received.append((kind, run_id))
        arrived.set()

    async with anyio.create_task_group() as group:
        group.start_soon(producer.listen, handler)
        with anyio.fail_after(WAIT):
            while not arrived.is_set():  # a subscription takes a moment: send until it is heard
                await other.send("stopped", "run_1")
                with anyio.move_on_after(0.1):
                    await arrived.wait()
        group.cancel_scope.cancel()

    assert received[0] == ("stopped", "run_1")


async def test_a_run_whose_producer_died_reads_as_lost_elsewhere(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    producer = RedisRunLogs(redis_server.url, key_prefix=prefix, alive_seconds=0.6)
    reader = RedisRunLogs(redis_server.url, key_prefix=prefix, alive_seconds=0.6)
    try:
        log = await producer.create(meta(), ttl=60)
        log.append((TEXT, b"partial"))
        # No heartbeat, no end: the producer is gone, as a killed replica would be.
        with anyio.fail_after(WAIT):
            entries = await reader.read(log.meta.run_id, 0, None)
            while entries[-1][0] != END:
                entries += await reader.read(log.meta.run_id, len(entries), None)
        assert entries[0] == (TEXT, b"partial")
        assert json.loads(entries[-1][1])["reason"] == "lost"
    finally:
        await producer.close()
        await reader.close()


async def test_a_heartbeat_keeps_a_quiet_run_alive_for_readers_elsewhere(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    producer = RedisRunLogs(redis_server.url, key_prefix=prefix, alive_seconds=0.6)
    reader = RedisRunLogs(redis_server.url, key_prefix=prefix, alive_seconds=0.6)
    try:
        log = await producer.create(meta(), ttl=60)
        for _ in range(4):  # twice the alive time in all, with a heartbeat every 0.3 s
            await producer.heartbeat([log.meta.run_id], 0.6)
            assert await reader.read(log.meta.run_id, 0, 0.3) == []
        log.append((TEXT, b"still here"))
        assert await reader.read(log.meta.run_id, 0, WAIT) == [(TEXT, b"still here")]
        await log.close(ending(), keep_seconds=60)
    finally:
        await producer.close()
        await reader.close()


def test_a_meta_written_by_a_newer_version_is_still_read() -> None:
    meta = RunMeta("run_1", "guest:a", "msg_1", "tutor", "chat-1", started_at=5.0)
    written = {**meta.__dict__, "field_of_a_later_version": [1, 2]}
    assert RunMeta.of(written) == meta
    with pytest.raises(TypeError):
        RunMeta.of({"run_id": "run_1"})  # one it needs is missing
    with pytest.raises(TypeError):
        RunMeta.of(["run_1"])


def test_expiring_forgets_keys_nobody_reads_again(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("proxy.storage.runlog.time.monotonic", lambda: now[0])
    kept: Expiring[int] = Expiring()
    kept.put("short", 1, 10)
    kept.put("long", 2, 100)
    kept.put("renewed", 3, 10)
    kept.put("renewed", 4, 100)  # written again: its first expiry no longer counts
    now[0] += 50
    kept.put("new", 5, 10)  # a write drops what is due, read or not
    assert set(kept._items) == {"long", "renewed", "new"}
    assert (kept.get("short"), kept.get("long"), kept.get("renewed")) == (None, 2, 4)
    now[0] += 60
    assert kept.get("long") is None and kept.get("new") is None


async def test_a_short_run_is_created_written_and_closed_in_one_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its creation and its close ride the writer's pipeline with its entries (before: a MULTI for the
    # creation, the writer's pipeline, and a script for the close: three round trips).
    sent: list[int] = []
    original = redis.asyncio.client.Pipeline.execute

    async def counted(self: redis.asyncio.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        sent.append(len(self.command_stack))
        return await original(self, raise_on_error)

    monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", counted)
    prefix = f"test-{uuid.uuid4().hex}:"
    producer = RedisRunLogs(redis_server.url, key_prefix=prefix)
    reader = RedisRunLogs(redis_server.url, key_prefix=prefix)
    try:
        log = await producer.create(meta(chat_id=None), ttl=60)
        log.append((OPEN, b""))
        log.append((TEXT, b"owls"))
        await log.close(ending(), keep_seconds=60)
        assert len(sent) == 1
        assert await reader.meta(log.meta.run_id) == log.meta
        assert await read_all(reader, log.meta.run_id) == [(OPEN, b""), (TEXT, b"owls"), ending()]
    finally:
        await producer.close()
        await reader.close()


async def test_waiting_for_the_writer_ends_with_the_batch_it_waited_for(redis_server: RedisServer) -> None:
    # Under load the one writer never runs dry: new entries arrive during every write. A caller (a
    # run's close, a chat's lookup) waits for what was queued before it asked, not for the writer
    # to run dry.
    producer = RedisRunLogs(redis_server.url, key_prefix=f"test-{uuid.uuid4().hex}:")
    busy = await producer.create(meta(chat_id=None), ttl=60)
    batches: list[int] = []
    write = producer._write
    keep_busy = True

    async def write_and_more(batch: list[Any]) -> None:
        batches.append(len(batch))
        if keep_busy:
            busy.append((TEXT, b"more"))  # another run's chunk, while this batch is on its way
        await write(batch)

    producer._write = write_and_more  # type: ignore[method-assign]
    try:
        log = await producer.create(meta(chat_id=None), ttl=60)
        with anyio.fail_after(WAIT):
            await producer.written()
            await log.close(ending(), keep_seconds=60)
        assert len(batches) <= 4  # what was queued, then the close and what came in meanwhile
    finally:
        keep_busy = False
        with anyio.fail_after(WAIT):
            await producer.written()
        await producer.close()
