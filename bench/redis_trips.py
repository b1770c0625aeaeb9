"""Redis round trips per relay: what workflow-bff sends its redis-server during one idle relay.

A MONITOR connection (raw RESP over a socket) to the bench's redis-server sees every command the
proxy sends, stamped by redis-server's clock. The relay's commands are split at the moment the bench
upstream received the relay's first request (the token mint; the stream request when a pooled token
saved the mint): those before it are the relay's **admission** (session, budget, slot, limit, the
run's log), the rest are the relay itself and its end (chunks mirrored, slot released, usage counted).

What MONITOR shows is commands, not round trips. A round trip is one request the proxy waits on:
commands a script runs (`[0 lua]` lines) are inside their EVAL, a MULTI … EXEC goes in one write, and
so do commands pipelined without a transaction, which redis-server reads in one go and stamps
microseconds apart; a real round trip is the proxy waking on a reply and sending again, tens of
microseconds at the least. So: a new round trip whenever the connection changes or more than
PIPELINED_GAP_S passed since the connection's previous command.

This phase runs on its own, after the measured ones: MONITOR slows redis-server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from dataclasses import dataclass, field

from bench.load import ConnectionPool
from bench.phases import Metrics, StreamShape, Target

PIPELINED_GAP_S = 25e-6
QUIET_SECONDS = 0.1  # a relay's end is over once its redis-server has seen nothing for this long
QUIET_LIMIT_SECONDS = 2.0
WARM_RELAYS = 2
LINE = re.compile(r'^\+?(?P<at>\d+\.\d+) \[\d+ (?P<client>[^\]]+)\] "(?P<name>[^"]*)"')


@dataclass(frozen=True)
class Command:
    at: float  # redis-server's wall clock (s)
    client: str  # "127.0.0.1:port", or "lua" for a command a script ran
    name: str

    @property
    def scripted(self) -> bool:
        return self.client == "lua"


def parse(line: str) -> Command | None:
    """One MONITOR line (`1796623247.588762 [0 127.0.0.1:41232] "EVALSHA" …`), or None."""
    found = LINE.match(line)
    return None if found is None else Command(float(found["at"]), found["client"], found["name"].upper())


def round_trips(commands: list[Command]) -> int:
    """How many requests the proxy waited on to send `commands` (see the module's docstring)."""
    trips = 0
    last: dict[str, float] = {}
    in_transaction: set[str] = set()
    for command in commands:
        if command.scripted:
            continue
        previous = last.get(command.client)
        if command.client not in in_transaction and (previous is None or command.at - previous > PIPELINED_GAP_S):
            trips += 1
        last[command.client] = command.at
        if command.name == "MULTI":
            in_transaction.add(command.client)
        elif command.name in ("EXEC", "DISCARD"):
            in_transaction.discard(command.client)
    return trips


def named(commands: list[Command]) -> list[str]:
    return [command.name.lower() if command.scripted else command.name for command in commands]


@dataclass
class Monitor:
    """Every command redis-server on `port` runs while the monitor is open, as it sees them."""

    port: int
    commands: list[Command] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    _writer: asyncio.StreamWriter | None = None
    _reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(b"MONITOR\r\n")
        await self._writer.drain()
        if not (await reader.readline()).startswith(b"+OK"):
            raise RuntimeError("redis-server refused MONITOR")
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            command = parse(line.decode(errors="replace"))
            if command is not None:
                self.commands.append(command)
                self.seen.set()

    async def quiet(self) -> None:
        """Until nothing has reached redis-server for QUIET_SECONDS (at most QUIET_LIMIT_SECONDS)."""
        deadline = time.monotonic() + QUIET_LIMIT_SECONDS
        while time.monotonic() < deadline:
            self.seen.clear()
            try:
                await asyncio.wait_for(self.seen.wait(), QUIET_SECONDS)
            except TimeoutError:
                return

    async def __aexit__(self, *exc: object) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class Relay:
    """The commands one relay sent, split at the upstream's first request for it."""

    admission: list[Command]
    rest: list[Command]


async def relays(target: Target, count: int, request_timeout: float) -> list[Relay]:
    """`count` idle one-chunk relays, one after another, each with the commands it sent."""
    assert target.storage is not None, "round trips are counted on a target with a redis-server"
    shape = StreamShape(chunks=1, delay_ms=0, size=24, trace=True)
    await target.prepare(WARM_RELAYS + count, 1)
    pool = ConnectionPool(target.endpoint)
    windows: list[tuple[str, float, float, list[Command]]] = []
    try:
        async with Monitor(target.storage.port) as monitor:
            for index in range(WARM_RELAYS + count):
                topic = f"{target.name}-trips-{index}"
                await monitor.quiet()
                first = len(monitor.commands)
                # redis-server stamps with the wall clock, the upstream and the load generator with
                # CLOCK_MONOTONIC: the difference, read here, puts them on one clock.
                wall_minus_monotonic = time.time() - time.monotonic()
                exchange = await pool.send(target.stream_request(topic, shape), request_timeout)
                target.check("trips", topic, exchange, shape)
                await monitor.quiet()
                if index >= WARM_RELAYS:
                    windows.append((topic, exchange.sent_at, wall_minus_monotonic, monitor.commands[first:]))
    finally:
        pool.close()
    streams, mints = await target.upstream_records()
    found = []
    for topic, _, offset, commands in windows:
        stream = streams.get(topic)
        first_upstream = mints.get(topic, stream["received"] / 1e6 if stream else None)
        if first_upstream is None:
            raise RuntimeError(f"the upstream has no record of {topic}: cannot split its commands")
        split = first_upstream + offset
        found.append(Relay([c for c in commands if c.at < split], [c for c in commands if c.at >= split]))
    return found


async def per_relay(target: Target, count: int, request_timeout: float) -> tuple[Metrics, dict[str, list[str]]]:
    """Round trips and commands per relay (medians over `count` relays: a background task's command,
    a lease renewal say, can land in one relay's window, not in most), and one relay's commands."""
    found = await relays(target, count, request_timeout)
    if not found:
        return {}, {}

    def middle(values: list[int]) -> float:
        return float(statistics.median(values))

    metrics: Metrics = {
        "redis_admission_trips": middle([round_trips(r.admission) for r in found]),
        "redis_admission_commands": middle([sum(not c.scripted for c in r.admission) for r in found]),
        "redis_relay_trips": middle([round_trips(r.rest) for r in found]),
        "redis_relay_commands": middle([sum(not c.scripted for c in r.rest) for r in found]),
    }
    last = found[-1]
    return metrics, {"admission": named(last.admission), "relay": named(last.rest)}
