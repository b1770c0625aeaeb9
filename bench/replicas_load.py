"""A bounded load test of the multi-replica limits (issue 5): many users streaming at once through two
replicas that share one Redis, while their rate limit and stream cap are being hit.

Every user signs in, then sends `rounds` waves of `cap + 1` concurrent stream requests, alternating
between the replicas (the balancer's round robin), more than the cap lets through at once and more
than the rate limit allows in all. Some admitted streams are abandoned by their browser after the
first chunk. The run passes only if:

- every refused request got a 429 `rate_limited` or `too_many_streams` with a `Retry-After`, and
  anything else (a 5xx, a network error) is a failure;
- every admitted stream that was read to the end is byte-exact (`proxy.emulator.generate_text`);
- no user had more streams admitted than the rate limit allows, nor (as their browser saw it) more
  open at once than the cap, whichever replica answered;
- refused requests never reached the upstream;
- no stream slot leaked: at the end every user holds no lease in Redis and each replica reports no
  open stream, checked well within the lease time, so a slot that was dropped rather than released
  would still show.

Real processes on loopback (redis-server, the emulated upstream, two `python -m proxy serve`), bounded
in count and time. `tests/test_load.py` runs it small in `make test`; for more:

    .venv/bin/python -m bench.replicas_load --users 200
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from proxy.emulator import generate_text
from proxy.slots import StreamSlots
from proxy.storage import RedisStorage
from tests.servers import TEST_API_KEY, RedisServer, ServerProcess, start_proxy

STREAM_PATH = "/api/workflows/tutor/stream"
WORKFLOW_ID = "wf_tutor"
REFUSAL_CODES = frozenset({"rate_limited", "too_many_streams"})
# A slot must be released when its stream ends, not found lapsed later: the leak check runs within
# this many seconds of the last stream, well inside the lease the replicas run with.
RELEASE_BOUND_SECONDS = 5.0
LEASE_SECONDS = 30
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class LoadConfig:
    users: int = 40
    rounds: int = 3  # waves of `cap + 1` concurrent requests per user
    cap: int = 2  # BFF_MAX_CONCURRENT_STREAMS
    relays_per_minute: int = 3  # BFF_RATE_LIMITS relay=
    abandon_every: int = 4  # every n-th request leaves after its first chunk if admitted (0: none)
    chunk_delay: float = 0.01  # the emulated model's pace, seconds between words
    time_limit: float = 120.0  # the whole load phase, seconds


@dataclass
class Outcome:
    user: int
    replica: int
    status: int  # 0: no HTTP answer at all
    code: str = ""  # the error code of a refusal, or what went wrong
    retry_after: str | None = None
    abandoned: bool = False
    exact: bool | None = None  # admitted and read to the end: was it byte-exact?
    opened_at: float = 0.0  # client-side, monotonic: headers received ...
    closed_at: float = 0.0  # ... body finished or abandoned


@dataclass
class LoadReport:
    config: LoadConfig
    outcomes: list[Outcome] = field(default_factory=list)
    upstream_streams: int = 0
    leaked_slots: dict[int, int] = field(default_factory=dict)  # user -> leases still held
    open_streams: list[float] = field(default_factory=list)  # each replica's bff_open_streams gauge
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def admitted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def refusals(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes if o.status == 429)

    def summary(self) -> str:
        config, admitted = self.config, self.admitted
        refusals = ", ".join(f"{count} {code}" for code, count in sorted(self.refusals().items())) or "none"
        lines = [
            f"{config.users} users x {config.rounds} waves of {config.cap + 1} through 2 replicas "
            f"(cap {config.cap}, relay={config.relays_per_minute}/minute): {len(self.outcomes)} requests "
            f"in {self.seconds:.1f} s",
            f"admitted {len(admitted)} ({sum(o.exact is True for o in admitted)} byte-exact, "
            f"{sum(o.abandoned for o in admitted)} abandoned by the browser); refused: {refusals}",
            f"upstream streams {self.upstream_streams}; slots held at the end "
            f"{sum(self.leaked_slots.values())}; open streams per replica {self.open_streams}",
        ]
        lines += [f"PROBLEM: {problem}" for problem in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"... and {len(self.problems) - 20} more problems")
        return "\n".join(lines)


@dataclass
class Deployment:
    redis: RedisServer
    emulator: ServerProcess
    replicas: list[ServerProcess]


@contextmanager
def deployment(config: LoadConfig) -> Iterator[Deployment]:
    """redis-server, the emulated upstream and two replicas sharing that Redis, all on loopback."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed")
    started: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="bff-load-") as data_dir:
        redis = RedisServer(executable, Path(data_dir)).start()
        try:
            # Far above what the run mints, so the upstream's own limit never answers for ours.
            command = ["emulator", "--chunk-delay", str(config.chunk_delay), "--rate-limit", "1000000"]
            emulator = ServerProcess(command, {"BFF_API_KEY": TEST_API_KEY}).start()
            started.append(emulator)
            env = {
                "BFF_STORAGE_URL": redis.url,
                "BFF_RATE_LIMITS": f"mint=1000/minute;relay={config.relays_per_minute}/minute;login=1000000/minute",
                "BFF_MAX_CONCURRENT_STREAMS": str(config.cap),
                "BFF_STREAM_LEASE_SECONDS": str(LEASE_SECONDS),
            }
            for _ in range(2):
                started.append(start_proxy(emulator.url, **env))
            yield Deployment(redis, emulator, started[1:])
        finally:
            for server in reversed(started):
                server.stop()
            redis.stop()


def expected_text(inputs: dict[str, str]) -> bytes:
    return generate_text(WORKFLOW_ID, inputs).encode()


async def one_request(
    client: httpx.AsyncClient, url: str, outcome: Outcome, inputs: dict[str, str], abandon: bool
) -> None:
    try:
        async with client.stream("POST", url + STREAM_PATH, json=inputs) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                body = await response.aread()
                outcome.retry_after = response.headers.get("retry-after")
                outcome.code = error_code(body)
                return
            outcome.opened_at = time.monotonic()
            if abandon:
                outcome.abandoned = True
                async for _ in response.aiter_raw():
                    break  # the browser leaves after the first chunk; closing the stream tells the replica
            else:
                outcome.exact = await response.aread() == expected_text(inputs)
            outcome.closed_at = time.monotonic()
    except httpx.HTTPError as exc:
        outcome.code = f"{outcome.code or 'network'}: {type(exc).__name__}"
        outcome.closed_at = time.monotonic()


def error_code(body: bytes) -> str:
    match = re.search(rb'"code":\s*"([a-z_]+)"', body)
    return match.group(1).decode() if match else "unreadable"


async def one_user(user: int, urls: Sequence[str], config: LoadConfig, report: LoadReport) -> str:
    """Sign in, then send the waves; returns the user id (for the leak check)."""
    limits = httpx.Limits(max_connections=config.cap + 2)
    async with httpx.AsyncClient(headers={"X-CSRF": "1"}, timeout=60.0, limits=limits) as client:
        signed_in = await client.post(urls[user % 2] + "/auth/guest")
        signed_in.raise_for_status()
        user_id: str = signed_in.json()["user"]["id"]
        sent = 0
        for wave in range(config.rounds):
            requests = []
            for _ in range(config.cap + 1):
                replica = (user + sent) % 2
                outcome = Outcome(user, replica, 0)
                report.outcomes.append(outcome)
                inputs = {"message": f"user {user} wave {wave} request {sent}"}
                abandon = config.abandon_every > 0 and sent % config.abandon_every == config.abandon_every - 1
                requests.append(one_request(client, urls[replica], outcome, inputs, abandon))
                sent += 1
            await asyncio.gather(*requests)
        return user_id


async def open_streams_gauge(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(url + "/metrics")).text
    match = re.search(r"^bff_open_streams (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else -1.0


async def settled(deploy: Deployment, config: LoadConfig, user_ids: list[str], report: LoadReport) -> None:
    """Wait (bounded) for every slot to be released and every replica to count no open stream."""
    storage = RedisStorage(deploy.redis.url)
    slots = StreamSlots(storage, config.cap)
    deadline = time.monotonic() + RELEASE_BOUND_SECONDS
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                held = [await slots.open(user_id) for user_id in user_ids]
                report.leaked_slots = {user: count for user, count in enumerate(held) if count}
                report.open_streams = [await open_streams_gauge(client, r.url) for r in deploy.replicas]
                if not report.leaked_slots and report.open_streams == [0.0, 0.0]:
                    return
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(POLL_SECONDS)
    finally:
        await storage.close()


def judge(report: LoadReport) -> None:
    config = report.config
    for outcome in report.outcomes:
        where = f"user {outcome.user} on replica {outcome.replica}"
        if outcome.status == 429:
            if outcome.code not in REFUSAL_CODES:
                report.problems.append(f"{where}: 429 with code {outcome.code!r}")
            if not (outcome.retry_after or "").isdigit() or int(outcome.retry_after or "0") < 1:
                report.problems.append(f"{where}: 429 {outcome.code} without a Retry-After")
        elif outcome.status != 200:
            report.problems.append(f"{where}: answered {outcome.status or 'nothing'} ({outcome.code})")
        elif outcome.code:
            report.problems.append(f"{where}: admitted stream broke off ({outcome.code})")
        elif outcome.exact is False:
            report.problems.append(f"{where}: stream not byte-exact")
    for user in range(config.users):
        mine = [o for o in report.admitted if o.user == user]
        if len(mine) > config.relays_per_minute:
            report.problems.append(f"user {user}: {len(mine)} streams admitted, rate limit {config.relays_per_minute}")
        if max_overlap(mine) > config.cap:
            report.problems.append(f"user {user}: {max_overlap(mine)} streams open at once, cap {config.cap}")
    if report.upstream_streams != len(report.admitted):
        report.problems.append(f"{report.upstream_streams} upstream streams for {len(report.admitted)} admitted")
    refusals = report.refusals()
    for code in sorted(REFUSAL_CODES):
        if not refusals[code]:
            report.problems.append(f"no request was refused {code}: the load never reached that limit")
    for user, count in sorted(report.leaked_slots.items()):
        report.problems.append(
            f"user {user}: {count} stream slot(s) still held {RELEASE_BOUND_SECONDS} s after the end"
        )
    if report.open_streams != [0.0, 0.0]:
        report.problems.append(f"replicas still count open streams: {report.open_streams}")


def max_overlap(outcomes: list[Outcome]) -> int:
    """The most streams open at one moment, from the browser's side (within the replica's slot)."""
    edges = sorted([(o.opened_at, 1) for o in outcomes] + [(o.closed_at, -1) for o in outcomes])
    most = current = 0
    for _, step in edges:  # a close sorts before an open at the same instant
        current += step
        most = max(most, current)
    return most


async def drive(deploy: Deployment, config: LoadConfig) -> LoadReport:
    report = LoadReport(config)
    urls = [replica.url for replica in deploy.replicas]
    started = time.monotonic()
    try:
        async with asyncio.timeout(config.time_limit):
            user_ids = await asyncio.gather(*(one_user(user, urls, config, report) for user in range(config.users)))
    except TimeoutError:
        report.problems.append(f"the load did not finish within {config.time_limit} s")
        return report
    report.seconds = time.monotonic() - started
    await settled(deploy, config, list(user_ids), report)
    async with httpx.AsyncClient(base_url=deploy.emulator.url, timeout=10.0) as control:
        requests = (await control.get("/_control/requests")).json()
    report.upstream_streams = sum(1 for request in requests if request["op"] == "stream")
    judge(report)
    return report


def run(config: LoadConfig) -> LoadReport:
    with deployment(config) as deploy:
        return asyncio.run(drive(deploy, config))


def main(argv: list[str] | None = None) -> int:
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="waves of cap+1 requests per user")
    parser.add_argument("--cap", type=int, default=defaults.cap, help="BFF_MAX_CONCURRENT_STREAMS")
    parser.add_argument("--relays-per-minute", type=int, default=defaults.relays_per_minute)
    parser.add_argument("--abandon-every", type=int, default=defaults.abandon_every)
    parser.add_argument("--chunk-delay", type=float, default=defaults.chunk_delay)
    parser.add_argument("--time-limit", type=float, default=defaults.time_limit)
    args = parser.parse_args(argv)
    config = LoadConfig(
        users=args.users,
        rounds=args.rounds,
        cap=args.cap,
        relays_per_minute=args.relays_per_minute,
        abandon_every=args.abandon_every,
        chunk_delay=args.chunk_delay,
        time_limit=args.time_limit,
    )
    report = run(config)
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
