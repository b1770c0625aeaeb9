"""Does a rate-limit check stall the event loop? slowapi's synchronous path against limits.aio.

Both check the same moving-window limit in the same real redis-server, reached through a loopback
TCP proxy that adds a fixed delay each way (a Redis in another zone is ~1 ms away, not 50 us). While
N checks run, a ticker asks the loop to wake it every millisecond and records how late it wakes:
that lateness is what every open stream on the same worker suffers.

    .venv/bin/python bench/limiter_stall.py [--checks 300] [--delay-ms 1.0]

Prints a table and exits; every server listens on 127.0.0.1 and stops with the run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable

from limits import parse
from slowapi import Limiter
from slowapi.util import get_remote_address

from proxy.metrics import Metrics
from proxy.rate_limiter import RateLimiter
from proxy.storage import open_limits_storage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_delay_proxy(listen_port: int, target_port: int, delay: float) -> Callable[[], None]:
    """Forwards TCP to the target, holding every chunk back `delay` seconds in each direction.

    It runs on its own thread and event loop: a synchronous client blocking the benchmark's loop must
    not also block the proxy it is waiting for. Returns a function that stops it.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def serve() -> None:
        await asyncio.start_server(handle, "127.0.0.1", listen_port)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop)
    ready.wait(10)

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return stop


async def loop_lag_while(work: Callable[[], Awaitable[None]]) -> tuple[list[float], float]:
    """Run `work` while a 1 ms ticker measures how late the loop wakes it; (lags in ms, seconds)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - before - 0.001) * 1000)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    return lags, elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(checks: int, delay_ms: float) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    redis_port, proxy_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        redis = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", data],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", redis_port), 0.1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            stop_proxy = start_delay_proxy(proxy_port, redis_port, delay_ms / 2000)
            url = f"redis://127.0.0.1:{proxy_port}/0"
            item = parse("1000000/minute")

            # slowapi: the exact call its decorator makes per request, `Limiter.limiter.hit`, sync.
            slowapi_limiter = Limiter(key_func=get_remote_address, storage_uri=url, strategy="moving-window")

            async def slowapi_checks() -> None:
                async def one(i: int) -> None:
                    slowapi_limiter.limiter.hit(item, "bench", f"user{i % 50}")

                await asyncio.gather(*(one(i) for i in range(checks)))

            ours = RateLimiter(open_limits_storage(url), {"relay": [item]}, metrics=Metrics())

            async def async_checks() -> None:
                await asyncio.gather(*(ours.check("relay", f"user{i % 50}") for i in range(checks)))

            # Warm both paths once at full concurrency, so opening connections is not what is measured.
            await slowapi_checks()
            await async_checks()

            rows = []
            for name, work in (("slowapi (sync Redis)", slowapi_checks), ("limits.aio (workflow-bff)", async_checks)):
                lags, elapsed = await loop_lag_while(work)
                rows.append((name, max(lags), percentile(lags, 0.99), statistics.median(lags), elapsed, len(lags)))
            stop_proxy()
        finally:
            redis.terminate()
            redis.wait(10)

    print(f"{checks} concurrent limit checks, Redis {delay_ms} ms away (round trip), moving window\n")
    print("| path | loop stall max (ms) | p99 (ms) | median (ms) | wall time (s) | ticks |")
    print("|---|---|---|---|---|---|")
    for name, worst, p99, median, elapsed, ticks in rows:
        print(f"| {name} | {worst:.1f} | {p99:.1f} | {median:.2f} | {elapsed:.2f} | {ticks} |")
    print(
        f"\nslowapi blocks the loop {rows[0][1] / max(rows[1][1], 0.01):.0f}x longer at worst: while it waits for"
        " Redis no stream on the worker moves."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=300)
    parser.add_argument("--delay-ms", type=float, default=1.0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.checks, arguments.delay_ms))
