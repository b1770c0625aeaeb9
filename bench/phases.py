"""What is measured, phase by phase, against one running target.

Every phase sends bench streams (bench/upstream.mjs decides their shape from the inputs), checks
every body byte for byte, and returns plain numbers. Failures are collected, never raised, so one
broken target cannot hide the others' results.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.load import Connection, ConnectionPool, Endpoint, Exchange, expected_chunks
from bench.servers import BENCH_API_KEY, WORKFLOW_ALIAS, WORKFLOW_ID, Server, cpu_ns, cpu_ticks_ns
from bench.stats import percentile, thin

Metrics = dict[str, float | None]
SAMPLE_SECONDS = 0.1


@dataclass(frozen=True)
class StreamShape:
    chunks: int
    delay_ms: float
    size: int
    trace: bool = False

    def inputs(self, topic: str) -> bytes:
        body = {"topic": topic, "chunks": str(self.chunks), "delay_ms": f"{self.delay_ms:g}", "size": str(self.size)}
        if self.trace:
            body["trace"] = "1"
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Failure:
    target: str
    phase: str
    topic: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"target": self.target, "phase": self.phase, "topic": self.topic, "detail": self.detail}


@dataclass
class Target:
    """A running target as the load generator sees it: where to send a stream and how to sign it."""

    name: str
    endpoint: Endpoint
    upstream: Endpoint
    upstream_server: Server
    proxy: Server | None
    storage: Server | None = None  # the redis-server the proxy keeps its state in, if any
    tokens: list[str] = field(default_factory=list)
    cookies: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    _next_cookie: int = 0

    @property
    def is_bff(self) -> bool:
        return self.name.startswith("bff")

    async def prepare(self, streams: int, sessions: int) -> None:
        """Hold what `streams` requests will need: upstream tokens, or signed-in guest sessions."""
        if self.is_bff:
            while len(self.cookies) < sessions:
                self.cookies.append(await self.sign_in())
        else:
            need = streams - len(self.tokens)
            if need > 0:
                found = await self.upstream.json("POST", f"/_bench/tokens?n={need}")
                assert isinstance(found, list)
                self.tokens += [str(token) for token in found]

    async def sign_in(self) -> str:
        exchange = await self.endpoint.fetch(self.endpoint.request("POST", "/auth/guest", headers={"X-CSRF": "1"}))
        cookie = exchange.headers.get("set-cookie", "").split(";", 1)[0]
        if exchange.status != 200 or "=" not in cookie:
            raise RuntimeError(
                f"guest sign-in failed: {exchange.status} {exchange.error} {bytes(exchange.body)[:200]!r}"
            )
        return cookie

    def stream_request(self, topic: str, shape: StreamShape) -> bytes:
        body = shape.inputs(topic)
        if self.is_bff:
            cookie = self.cookies[self._next_cookie % len(self.cookies)]
            self._next_cookie += 1
            headers = {"Cookie": cookie, "X-CSRF": "1", "X-Request-ID": topic}
            return self.endpoint.request("POST", f"/api/workflows/{WORKFLOW_ALIAS}/stream", body=body, headers=headers)
        token = self.tokens.pop()
        return self.endpoint.request("POST", f"/api/v1/run/{WORKFLOW_ID}/stream?token={token}", body=body)

    def check(self, phase: str, topic: str, exchange: Exchange, shape: StreamShape) -> bool:
        """True when the stream arrived whole and byte-exact; otherwise records why not."""
        expected = b"".join(expected_chunks(topic, shape.chunks, shape.size))
        if exchange.ok and exchange.body == expected:
            return True
        if exchange.error is not None or exchange.status != 200:
            detail = f"status {exchange.status}, {exchange.error or 'no error'}: {bytes(exchange.body[:160])!r}"
        else:
            detail = f"body differs: {len(exchange.body)} bytes received, {len(expected)} expected"
        self.failures.append(Failure(self.name, phase, topic, detail))
        return False

    # --- counters ----------------------------------------------------------------------------

    def proxy_cpu(self) -> int:
        return self.proxy.cpu_ns() if self.proxy is not None else 0

    def storage_cpu(self) -> int:
        return self.storage.cpu_ns() if self.storage is not None else 0

    def proxy_cpu_ticks(self) -> int:
        """utime+stime from /proc/<pid>/stat (10 ms ticks): a cross-check of `proxy_cpu`."""
        return cpu_ticks_ns(self.proxy.pids) if self.proxy is not None else 0

    async def reset_upstream(self) -> None:
        await self.upstream.json("POST", "/_bench/reset")

    async def upstream_stats(self) -> dict[str, Any]:
        found = await self.upstream.json("GET", "/_bench/stats")
        assert isinstance(found, dict)
        return found

    async def upstream_records(self) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """Stream records by topic, and mint arrival times (s) by request id."""
        found = await self.upstream.json("GET", "/_bench/records")
        assert isinstance(found, list)
        streams = {r["topic"]: r for r in found if r.get("kind") == "stream"}
        mints = {r["rid"]: r["received"] / 1e6 for r in found if r.get("kind") == "mint"}
        return streams, mints


def client_cpu() -> int:
    return cpu_ns([os.getpid()])


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def us(nanoseconds: float, count: int) -> float | None:
    return nanoseconds / 1000 / count if count else None


async def bounded(awaitable: Awaitable[Any], seconds: float) -> Any:
    return await asyncio.wait_for(awaitable, seconds)


# --- phases ----------------------------------------------------------------------------------


async def idle_ttfb(target: Target, count: int, warmup: int, request_timeout: float) -> tuple[Metrics, list[float]]:
    """One request at a time on a warm keep-alive connection: time to first byte with nothing else going on.

    The upstream's arrival stamps split the time in two: the request leg (client to the upstream's
    stream request; for workflow-bff this includes the session check and the token mint) and the
    response leg (the upstream's stream request to the client's first byte).
    """
    shape = StreamShape(chunks=1, delay_ms=0, size=24, trace=True)
    await target.prepare(count + warmup, 1)
    pool = ConnectionPool(target.endpoint)
    for index in range(warmup):
        topic = f"{target.name}-warm-{index}"
        target.check("idle", topic, await pool.send(target.stream_request(topic, shape), request_timeout), shape)
    await target.reset_upstream()
    done: list[tuple[str, Exchange]] = []
    for index in range(count):
        topic = f"{target.name}-idle-{index}"
        exchange = await pool.send(target.stream_request(topic, shape), request_timeout)
        if target.check("idle", topic, exchange, shape):
            done.append((topic, exchange))
    pool.close()
    streams, mints = await target.upstream_records()
    ttfb, request_leg, response_leg, to_mint, mint_to_stream = [], [], [], [], []
    for topic, exchange in done:
        first = exchange.first_byte_at
        assert first is not None
        ttfb.append(first - exchange.sent_at)
        record = streams.get(topic)
        if record is None:
            continue
        arrived = record["received"] / 1e6
        request_leg.append(arrived - exchange.sent_at)
        response_leg.append(first - arrived)
        if topic in mints:
            to_mint.append(mints[topic] - exchange.sent_at)
            mint_to_stream.append(arrived - mints[topic])
    metrics: Metrics = {
        "idle_ttfb_p50_ms": ms(percentile(ttfb, 50)),
        "idle_ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "idle_request_leg_p50_ms": ms(percentile(request_leg, 50)),
        "idle_response_leg_p50_ms": ms(percentile(response_leg, 50)),
        "idle_response_leg_p99_ms": ms(percentile(response_leg, 99)),
        "idle_to_mint_p50_ms": ms(percentile(to_mint, 50)),
        "idle_mint_to_stream_p50_ms": ms(percentile(mint_to_stream, 50)),
        "idle_failed": count - len(done),
    }
    return metrics, [t * 1000 for t in ttfb]


async def requests(
    target: Target, count: int, concurrency: int, request_timeout: float, prefix: str = "req"
) -> Metrics:
    """`count` one-chunk streams from `concurrency` keep-alive clients: CPU per relayed request,
    throughput, time to first byte under load, and how many upstream connections were opened."""
    shape = StreamShape(chunks=1, delay_ms=0, size=24)
    warmup = concurrency * 2
    await target.prepare(count + warmup, concurrency)
    pool = ConnectionPool(target.endpoint)

    async def run(label: str, total: int, exchanges: list[Exchange]) -> None:
        remaining = iter(range(total))

        async def client() -> None:
            for index in remaining:
                topic = f"{target.name}-{label}-{index}"
                exchange = await pool.send(target.stream_request(topic, shape), request_timeout)
                if target.check("requests", topic, exchange, shape):
                    exchanges.append(exchange)

        await asyncio.gather(*(client() for _ in range(concurrency)))

    await run(f"{prefix}warm", warmup, [])
    await target.reset_upstream()
    exchanges: list[Exchange] = []
    proxy0, upstream0, client0 = target.proxy_cpu(), target.upstream_server.cpu_ns(), client_cpu()
    ticks0 = target.proxy_cpu_ticks()
    started = time.monotonic()
    await run(prefix, count, exchanges)
    elapsed = time.monotonic() - started
    proxy1, upstream1, client1 = target.proxy_cpu(), target.upstream_server.cpu_ns(), client_cpu()
    ticks1 = target.proxy_cpu_ticks()
    pool.close()
    stats = await target.upstream_stats()
    ttfb = [e.ttfb() or 0.0 for e in exchanges]
    upstream_requests = int(stats["requests"])
    connections = int(stats["connections"]) - 1  # the connection that asked for these stats
    metrics: Metrics = {
        "_cpu_us": us(proxy1 - proxy0, count) if target.proxy is not None else None,
        "_cpu_stat_us": us(ticks1 - ticks0, count) if target.proxy is not None else None,
        "_upstream_cpu_us": us(upstream1 - upstream0, count),
        "_client_cpu_us": us(client1 - client0, count),
        "_per_s": count / elapsed if elapsed else None,
        "_ttfb_p50_ms": ms(percentile(ttfb, 50)),
        "_ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "_upstream_requests": upstream_requests,
        "_upstream_connections": connections,
        "_reuse_pct": 100 * (1 - connections / upstream_requests) if upstream_requests else None,
        "_failed": count - len(exchanges),
    }
    return {prefix + key: value for key, value in metrics.items()}


async def token_latency(target: Target, count: int, request_timeout: float) -> Metrics:
    """workflow-bff: `POST /api/token` one at a time. direct: the upstream mint it wraps, for scale."""
    if target.is_bff:
        await target.prepare(0, 1)
        request = target.endpoint.request(
            "POST",
            "/api/token",
            body=json.dumps({"workflow": WORKFLOW_ALIAS}).encode(),
            headers={"Cookie": target.cookies[0], "X-CSRF": "1"},
        )
    elif target.name == "direct":
        request = target.endpoint.request(
            "GET", "/api/v1/token?ttl=60", headers={"Authorization": f"Bearer {BENCH_API_KEY}"}
        )
    else:
        return {}
    pool = ConnectionPool(target.endpoint)
    latencies = []
    for index in range(count + 5):
        exchange = await pool.send(request, request_timeout)
        good = exchange.ok and b'"token"' in exchange.body
        if not good:
            detail = f"status {exchange.status}, {exchange.error}: {bytes(exchange.body[:160])!r}"
            target.failures.append(Failure(target.name, "token", f"token-{index}", detail))
        elif index >= 5 and exchange.done_at is not None:
            latencies.append(exchange.done_at - exchange.sent_at)
    pool.close()
    return {
        "token_p50_ms": ms(percentile(latencies, 50)),
        "token_p99_ms": ms(percentile(latencies, 99)),
        "token_failed": count - len(latencies),
    }


@dataclass
class Sample:
    at: float
    proxy_cpu: int
    upstream_cpu: int
    client_cpu: int
    proxy_rss: int
    storage_cpu: int


async def sampler(target: Target, samples: list[Sample], stop: asyncio.Event) -> None:
    while True:
        samples.append(
            Sample(
                time.monotonic(),
                target.proxy_cpu(),
                target.upstream_server.cpu_ns(),
                client_cpu(),
                target.proxy.rss() if target.proxy is not None else 0,
                target.storage_cpu(),
            )
        )
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


@dataclass
class StreamRun:
    """The raw outcome of many concurrent streams, before it is summarised."""

    exchanges: dict[str, Exchange]
    good: dict[str, Exchange]
    samples: list[Sample]
    arrivals: dict[str, list[float]]
    records: dict[str, dict[str, Any]]
    baseline_rss: int


async def open_streams(
    target: Target, phase: str, count: int, shape: StreamShape, request_timeout: float, ramp_seconds: float
) -> StreamRun:
    """Open `count` streams, each on its own connection, spread evenly over `ramp_seconds` (0: at once)."""
    await target.prepare(count, min(count, 200))
    await target.reset_upstream()
    baseline_rss = target.proxy.rss() if target.proxy is not None else 0
    samples: list[Sample] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(sampler(target, samples, stop))
    exchanges: dict[str, Exchange] = {}

    async def one(index: int) -> None:
        if ramp_seconds:
            await asyncio.sleep(ramp_seconds * index / count)
        topic = f"{target.name}-{phase}-{index}"
        exchanges[topic] = await target.endpoint.fetch(target.stream_request(topic, shape), request_timeout)

    await asyncio.gather(*(one(index) for index in range(count)))
    stop.set()
    await watcher
    records = (await target.upstream_records())[0] if shape.trace else {}
    good, arrivals = {}, {}
    for topic, exchange in exchanges.items():
        if target.check(phase, topic, exchange, shape):
            good[topic] = exchange
            chunks = expected_chunks(topic, shape.chunks, shape.size)
            arrivals[topic] = exchange.chunk_arrivals(chunks)
    return StreamRun(exchanges, good, samples, arrivals, records, baseline_rss)


def steady_window(run: StreamRun) -> tuple[float, float] | None:
    """From the moment every stream had its first byte to the moment the first one ended."""
    if not run.good or len(run.good) != len(run.exchanges):
        return None
    start = max(e.first_byte_at or 0.0 for e in run.good.values())
    end = min(e.done_at or 0.0 for e in run.good.values())
    return (start, end) if end > start else None


def gaps_in(run: StreamRun, window: tuple[float, float] | None) -> list[float]:
    """Seconds between consecutive chunks of each stream (only those arriving inside `window`)."""
    gaps = []
    for times in run.arrivals.values():
        for before, after in itertools.pairwise(times):
            if window is None or window[0] <= after <= window[1]:
                gaps.append(after - before)
    return gaps


async def streams(
    target: Target, count: int, shape: StreamShape, request_timeout: float
) -> tuple[Metrics, dict[str, list[float]]]:
    """`count` streams of `shape` opened at once: time to first byte under a burst, inter-chunk gaps
    and chunk delivery delay while they open and run, and CPU per chunk over the whole phase."""
    run = await open_streams(target, "streams", count, shape, request_timeout, ramp_seconds=0)
    ttfb = [e.ttfb(from_connect=True) or 0.0 for e in run.good.values()]
    connect = [e.sent_at - e.started_at for e in run.good.values()]
    gaps = gaps_in(run, None)
    delay = shape.delay_ms / 1000
    jitter = [abs(gap - delay) for gap in gaps]
    delivery = []
    for topic, times in run.arrivals.items():
        writes = (run.records.get(topic) or {}).get("writes") or []
        delivery += [arrived - written / 1e6 for arrived, written in zip(times, writes, strict=False)]
    total_chunks = sum(len(times) for times in run.arrivals.values())
    first, last = run.samples[0], run.samples[-1]
    metrics: Metrics = {
        "st_ttfb_p50_ms": ms(percentile(ttfb, 50)),
        "st_ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "st_connect_p99_ms": ms(percentile(connect, 99)),
        "st_gap_p50_ms": ms(percentile(gaps, 50)),
        "st_gap_p99_ms": ms(percentile(gaps, 99)),
        "st_jitter_p99_ms": ms(percentile(jitter, 99)),
        "st_delivery_p50_ms": ms(percentile(delivery, 50)),
        "st_delivery_p99_ms": ms(percentile(delivery, 99)),
        "st_cpu_chunk_all_us": (
            us(last.proxy_cpu - first.proxy_cpu, total_chunks) if target.proxy is not None else None
        ),
        "st_failed": count - len(run.good),
    }
    distributions = {"stream_ttfb_ms": thin(t * 1000 for t in ttfb), "gap_ms": thin(g * 1000 for g in gaps)}
    return metrics, distributions


def bytes_at(exchange: Exchange, moment: float) -> int:
    """Body bytes the client had received by `moment`."""
    times = [at for at, _ in exchange.arrivals]
    index = bisect.bisect_right(times, moment)
    return exchange.arrivals[index - 1][1] if index else 0


async def held_streams(
    target: Target,
    count: int,
    delay_ms: float,
    opening: int,
    open_seconds: float,
    settle_seconds: float,
    window_seconds: float,
    request_timeout: float,
) -> tuple[Metrics, dict[str, list[float]]]:
    """`count` open-ended streams at model pace, all held open together: the steady state.

    Streams open `opening` at a time (a new one as soon as one has its first byte), so that opening
    them never overloads the target: bursts are the `streams` phase's business. No stream starts
    opening after `open_seconds`: a target that cannot carry `count` streams at this pace is
    measured with the streams it holds. Once every opened stream has its first byte and
    `settle_seconds` passed, a window of `window_seconds` gives CPU per relayed chunk, memory per
    open stream and the inter-chunk gaps with nothing but relaying going on. Then the clients
    leave, every body must be a byte-exact prefix of its stream, and the upstream must see every
    stream closed.
    """
    shape = StreamShape(chunks=100_000, delay_ms=delay_ms, size=24)
    await target.prepare(count, min(count, 200))
    await target.reset_upstream()
    baseline_rss = target.proxy.rss() if target.proxy is not None else 0
    held: dict[str, tuple[Connection | None, Exchange]] = {}
    gate = asyncio.Semaphore(opening)
    began = time.monotonic()

    async def open_one(index: int) -> None:
        # Short topics keep every chunk exactly `size` bytes, so bytes received count chunks.
        topic = f"h{index}"
        started = asyncio.Event()
        async with gate:
            if time.monotonic() - began > open_seconds:
                return
            exchange = Exchange(started_at=time.monotonic(), started=started)
            held[topic] = (None, exchange)
            try:
                connection = await asyncio.wait_for(
                    Connection.open(target.endpoint.host, target.endpoint.port), request_timeout
                )
            except (OSError, TimeoutError) as exc:
                exchange.error = f"connect failed: {type(exc).__name__}: {exc}"
                return
            held[topic] = (connection, connection.start(target.stream_request(topic, shape), exchange))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(started.wait(), request_timeout)

    await asyncio.gather(*(open_one(index) for index in range(count)))
    opened_at = time.monotonic()
    await asyncio.sleep(settle_seconds)  # a measurement window, not a synchronisation
    samples: list[Sample] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(sampler(target, samples, stop))
    await asyncio.sleep(window_seconds)
    stop.set()
    await watcher
    for connection, _ in held.values():
        if connection is not None:
            connection.close()
    left_at = time.monotonic()
    still_open = await upstream_drained(target, request_timeout)
    a, b = samples[0], samples[-1]
    streams = len(held)
    relayed = 0
    gaps: list[float] = []
    failed = 0
    for topic, (_, exchange) in held.items():
        received = len(exchange.body)
        expected = b"".join(expected_chunks(topic, received // shape.size + 1, shape.size))[:received]
        if exchange.first_byte_at is None or exchange.status != 200 or exchange.body != expected:
            failed += 1
            detail = f"status {exchange.status}, {exchange.error or 'no error'}, {received} bytes"
            if exchange.status == 200 and exchange.body != expected:
                detail = f"body differs: {received} bytes are not a prefix of the stream"
            target.failures.append(Failure(target.name, "held", topic, detail))
            continue
        relayed += (bytes_at(exchange, b.at) - bytes_at(exchange, a.at)) // shape.size
        arrivals = exchange.chunk_arrivals(expected_chunks(topic, received // shape.size, shape.size))
        gaps += [after - before for before, after in itertools.pairwise(arrivals) if a.at <= after <= b.at]
    jitter = [abs(gap - delay_ms / 1000) for gap in gaps]
    metrics: Metrics = {
        "held_streams": streams,
        "held_open_s": opened_at - began,
        "held_cpu_chunk_us": us(b.proxy_cpu - a.proxy_cpu, relayed) if target.proxy is not None else None,
        "held_upstream_cpu_chunk_us": us(b.upstream_cpu - a.upstream_cpu, relayed),
        "held_client_cpu_chunk_us": us(b.client_cpu - a.client_cpu, relayed),
        "held_storage_cpu_chunk_us": us(b.storage_cpu - a.storage_cpu, relayed) if target.storage is not None else None,
        "held_kb_per_stream": (
            (max(s.proxy_rss for s in samples) - baseline_rss) / 1024 / streams
            if target.proxy is not None and streams
            else None
        ),
        "held_gap_p99_ms": ms(percentile(gaps, 99)),
        "held_jitter_p99_ms": ms(percentile(jitter, 99)),
        "held_chunks_per_s": relayed / (b.at - a.at) if b.at > a.at else None,
        "held_drain_ms": None if still_open else ms(time.monotonic() - left_at),
        "held_still_open": still_open,
        "held_failed": failed,
    }
    return metrics, {"held_gap_ms": thin(g * 1000 for g in gaps)}


async def upstream_drained(target: Target, limit_seconds: float) -> int:
    """Wait (bounded) until the upstream has no stream open; returns how many were still open."""
    deadline = time.monotonic() + limit_seconds
    while True:
        active = int((await target.upstream_stats())["active"])
        if active == 0 or time.monotonic() > deadline:
            return active
        await asyncio.sleep(0.02)  # polling the upstream's counter; bounded by the deadline


@dataclass
class Level:
    streams: int
    failed: int
    jitter_p99_ms: float | None
    window_s: float | None

    def holds(self, limit_ms: float) -> bool:
        return self.failed == 0 and self.jitter_p99_ms is not None and self.jitter_p99_ms < limit_ms


async def capacity(
    target: Target,
    levels: list[int],
    delay_ms: float,
    jitter_limit_ms: float,
    request_timeout: float,
    open_rate: float,
    steady_seconds: float,
    log: Callable[[str], None],
) -> list[Level]:
    """Streams held at model pace with inter-chunk jitter p99 under the limit, level by level.

    Streams open at `open_rate` per second (opening costs a proxy more than relaying), and each
    runs long enough that all are open together for about `steady_seconds`; the jitter (|gap - pace|)
    is taken over that window only. Stops at the first level that does not hold.
    """
    tried: list[Level] = []
    for level in levels:
        ramp = level / open_rate
        chunks = int((ramp + 1 + steady_seconds) * 1000 / delay_ms) + 1
        shape = StreamShape(chunks=chunks, delay_ms=delay_ms, size=24)
        run = await open_streams(target, f"cap{level}", level, shape, request_timeout, ramp_seconds=ramp)
        window = steady_window(run)
        gaps = gaps_in(run, window) if window else []
        jitter = [abs(gap - delay_ms / 1000) for gap in gaps]
        result = Level(
            level, level - len(run.good), ms(percentile(jitter, 99)), window[1] - window[0] if window else None
        )
        # Refused or cut streams at a level that does not hold are the measurement, not a harness
        # error; a complete answer with the wrong bytes is always an error.
        target.failures = [
            f for f in target.failures if not f.phase.startswith("cap") or f.detail.startswith("body differs")
        ]
        tried.append(result)
        shown = "no steady window" if result.jitter_p99_ms is None else f"jitter p99 {result.jitter_p99_ms:.1f} ms"
        log(f"  capacity {target.name}: {level} streams, {result.failed} failed, {shown}")
        if not result.holds(jitter_limit_ms):
            break
    return tried
