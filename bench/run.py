"""`python -m bench`: measure direct, nginx, bare relays and workflow-bff (its state in memory and in
Redis) side by side in one run.

    python -m bench                 # `make bench`: the full run (minutes); writes docs/PERFORMANCE.md + PNG
    python -m bench --quick         # `make bench-quick` (seconds, inside `make test`): small numbers,
                                    # asserts only that every target relayed every byte exactly

Each repeat starts every target afresh (its own upstream, its own proxy process), in a rotated
order, and runs the same phases against it; results are medians of the repeats with their range.
Everything listens on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bench import phases, redis_trips
from bench.load import Endpoint, Exchange, expected_chunks
from bench.phases import Level, Metrics, StreamShape, Target
from bench.profile import Profiler, categorise, py_spy, summarize
from bench.servers import (
    BFF_BENCH_ENV,
    BFF_POOL_SIZE,
    DEFAULT_TARGETS,
    REDIS_MISSING,
    ROOT,
    TARGETS,
    Server,
    machine_busy_ns,
    machine_steal_ns,
    nginx_binary,
    raise_nofile_limit,
    start_bare,
    start_bff,
    start_nginx,
    start_otlp_sink,
    start_redis,
    start_upstream,
    storage_env,
    tracing_env,
)
from bench.stats import thin

PHASE_LIMIT_SECONDS = 600.0  # no phase may run longer than this, whatever happens


@dataclass(frozen=True)
class Plan:
    quick: bool
    repeats: int
    targets: tuple[str, ...]
    idle_requests: int = 200
    idle_warmup: int = 20
    requests: int = 2000
    concurrency: int = 200
    low_requests: int = 1000
    low_concurrency: int = 10
    token_requests: int = 200
    streams: int = 1000
    stream_chunks: int = 100
    delay_ms: float = 50.0
    chunk_size: int = 24
    held_opening: int = 50
    held_open_seconds: float = 30.0
    held_settle_seconds: float = 1.0
    held_window_seconds: float = 3.0
    capacity_levels: tuple[int, ...] = (125, 250, 500, 1000, 2000, 4000)
    open_rate: float = 500.0
    steady_seconds: float = 3.0
    jitter_limit_ms: float = 20.0
    request_timeout: float = 60.0
    upstream_rtt_ms: float = 0.0
    worker_counts: tuple[int, ...] = (1, 2)  # `serve --workers N` sharing a redis-server
    pool_requests: int = 100  # idle streams per target against an upstream `pool_rtt_ms` away; 0: no pool phase
    pool_rtt_ms: float = 50.0
    trip_relays: int = 5  # idle relays whose Redis commands are counted (bff-redis); 0: no such phase
    profile_requests: int = 2000  # requests at `concurrency` under py-spy (bff, bff-redis); 0: no profile
    profile_rate: int = 1000  # py-spy samples per second during them


QUICK = {
    "idle_requests": 10,
    "idle_warmup": 3,
    "requests": 60,
    "concurrency": 6,
    "low_requests": 20,
    "low_concurrency": 2,
    "token_requests": 5,
    "streams": 30,
    "stream_chunks": 8,
    "delay_ms": 20.0,
    "held_opening": 10,
    "held_open_seconds": 10.0,
    "held_settle_seconds": 0.2,
    "held_window_seconds": 0.6,
    "capacity_levels": (),
    "request_timeout": 20.0,
    "pool_requests": 5,
    "pool_rtt_ms": 5.0,
    "trip_relays": 1,
    "profile_requests": 60,
}
# The token pool phase: what pre-minted tokens save a relay when the upstream is far away.
POOL_TARGETS = ("direct", "bff", "bff-pool")
# The targets whose relay is profiled (where each microsecond goes) after their measured phases.
PROFILED = ("bff", "bff-redis")
# What a phase that went wrong raises; it becomes a failure of the run, and the run goes on.
MEASURE_ERRORS = (RuntimeError, OSError, TimeoutError, AssertionError, ValueError)
R = TypeVar("R")


@dataclass
class TargetResults:
    repeats: list[Metrics] = field(default_factory=list)
    distributions: dict[str, list[float]] = field(default_factory=dict)
    capacity: list[Level] = field(default_factory=list)
    workers: list[Metrics] = field(default_factory=list)  # one row per worker count and repeat
    pool: list[Metrics] = field(default_factory=list)  # one row per repeat of the token pool phase
    profile: list[dict[str, int]] = field(default_factory=list)  # py-spy samples by part of a relay, per repeat
    profile_skipped: str | None = None  # why there is no profile
    redis_commands: dict[str, list[str]] = field(default_factory=dict)  # one relay's, admission and the rest
    skipped: str | None = None

    def add_distribution(self, name: str, values: list[float]) -> None:
        self.distributions.setdefault(name, []).extend(values)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def available(target: str) -> str | None:
    """Why `target` cannot run here, or None."""
    if target == "nginx" and nginx_binary() is None:
        return "nginx is not installed (apt-get install -y nginx)"
    if target == "bare-aiohttp" and importlib.util.find_spec("aiohttp") is None:
        return "aiohttp is not installed (pip install -e '.[bench]')"
    if target == "bff-redis" and shutil.which("redis-server") is None:
        return REDIS_MISSING
    return None


def start_target(
    name: str, workdir: Path, upstream: Server, storage: Server | None, sink: Server | None = None
) -> Server | None:
    if name == "direct":
        return None
    if name == "nginx":
        return start_nginx(workdir, upstream.port)
    if name.startswith("bare-"):
        return start_bare(workdir, upstream.port, name.removeprefix("bare-"))
    if name == "bff-pool":
        return start_bff(workdir, upstream.port, {"BFF_TOKEN_POOL": BFF_POOL_SIZE}, name)
    if sink is not None:
        return start_bff(workdir, upstream.port, tracing_env(sink), name)
    if storage is not None:
        return start_bff(workdir, upstream.port, storage_env(storage), name)
    return start_bff(workdir, upstream.port)


class Running:
    """One target with its own upstream (and bff-redis its own redis-server), started fresh and
    stopped on exit."""

    def __init__(self, name: str, workdir: Path, plan: Plan) -> None:
        self.name, self.workdir, self.plan = name, workdir, plan
        self.servers: list[Server] = []

    def __enter__(self) -> Target:
        upstream = start_upstream(self.workdir, self.plan.upstream_rtt_ms)
        self.servers.append(upstream)
        storage = None
        try:
            if self.name == "bff-redis":
                storage = start_redis(self.workdir)
                self.servers.append(storage)
            sink = None
            if self.name == "bff-traced":
                sink = start_otlp_sink(self.workdir)
                self.servers.append(sink)
            proxy = start_target(self.name, self.workdir, upstream, storage, sink)
        except BaseException:
            self.__exit__()
            raise
        if proxy is not None:
            self.servers.append(proxy)
        upstream_endpoint = Endpoint("127.0.0.1", upstream.port)
        endpoint = Endpoint("127.0.0.1", proxy.port) if proxy is not None else upstream_endpoint
        return Target(self.name, endpoint, upstream_endpoint, upstream, proxy, storage)

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self.servers):
            if not server.alive():
                log(f"  {server.name} had exited ({server.process.returncode}):\n{server.log_tail()}")
            server.stop()


async def measure(
    name: str, workdir: Path, plan: Plan, results: TargetResults, profiles: Path | None
) -> list[phases.Failure]:
    """Every phase once against a fresh `name`; returns the failures seen."""
    with Running(name, workdir, plan) as target:

        def profiled(phase: str) -> contextlib.AbstractContextManager[object]:
            if profiles is None or target.proxy is None or name == "nginx":
                return contextlib.nullcontext()
            return Profiler(target.proxy.process.pid, profiles / f"profile-{name}-{phase}.txt")

        bound = PHASE_LIMIT_SECONDS
        ours_before, busy_before, started = ours(target), machine_busy_ns(), time.monotonic()
        steal_before = machine_steal_ns()
        idle, idle_ttfb = await phases.bounded(
            phases.idle_ttfb(target, plan.idle_requests, plan.idle_warmup, plan.request_timeout), bound
        )
        token = await phases.bounded(phases.token_latency(target, plan.token_requests, plan.request_timeout), bound)
        with profiled("requests-low"):
            low = await phases.bounded(
                phases.requests(target, plan.low_requests, plan.low_concurrency, plan.request_timeout, "low"), bound
            )
        with profiled("requests"):
            load = await phases.bounded(
                phases.requests(target, plan.requests, plan.concurrency, plan.request_timeout), bound
            )
        # Held streams first: memory per stream is RSS growth, and CPython keeps the memory a previous
        # burst of streams used, so no earlier phase may have opened more streams than this one.
        with profiled("held"):
            held, held_distributions = await phases.bounded(
                phases.held_streams(
                    target,
                    plan.streams,
                    plan.delay_ms,
                    plan.held_opening,
                    plan.held_open_seconds,
                    plan.held_settle_seconds,
                    plan.held_window_seconds,
                    plan.request_timeout,
                ),
                bound,
            )
        shape = StreamShape(plan.stream_chunks, plan.delay_ms, plan.chunk_size, trace=True)
        with profiled("streams"):
            streams, distributions = await phases.bounded(
                phases.streams(target, plan.streams, shape, plan.request_timeout + shape.chunks * plan.delay_ms / 1000),
                bound,
            )
        if held.get("held_still_open"):
            detail = f"{held['held_still_open']} upstream streams still open after the clients left"
            target.failures.append(phases.Failure(name, "held", "-", detail))
        elsewhere = (machine_busy_ns() - busy_before) - (ours(target) - ours_before)
        machine = {
            "other_cpu_pct": pct_of_cores(elsewhere, started),
            "steal_pct": pct_of_cores(machine_steal_ns() - steal_before, started),
        }
        # After every measured phase: MONITOR slows redis-server down, and py-spy takes CPU.
        trips: Metrics = {}
        if name == "bff-redis" and plan.trip_relays:
            trips, results.redis_commands = await phases.bounded(
                redis_trips.per_relay(target, plan.trip_relays, plan.request_timeout), bound
            )
        if name in PROFILED and plan.profile_requests:
            path = (profiles or workdir) / f"profile-{name}-relay.txt"
            samples = await phases.bounded(profile_relays(target, plan, path), bound)
            if samples:
                results.profile.append(samples)
            else:
                results.profile_skipped = (
                    "py-spy is not installed (pip install -e '.[bench]')"
                    if py_spy() is None
                    else "py-spy took no samples (may it attach to another process? ptrace)"
                )
        for server in (target.upstream_server, target.proxy, target.storage):
            if server is not None and not server.alive():
                target.failures.append(phases.Failure(name, "server", "-", f"{server.name} exited"))
    metrics = {**idle, **token, **low, **load, **streams, **held, **machine, **trips}
    results.repeats.append(metrics)
    results.add_distribution("idle_ttfb_ms", idle_ttfb)
    for key, values in {**distributions, **held_distributions}.items():
        results.add_distribution(key, values)
    return target.failures


async def profile_relays(target: Target, plan: Plan, path: Path) -> dict[str, int]:
    """`plan.profile_requests` one-chunk relays at `plan.concurrency` under py-spy (into `path`): its
    samples by part of a relay. Not a measurement: py-spy shares the cores with everything else."""
    assert target.proxy is not None
    with Profiler(target.proxy.process.pid, path, plan.profile_rate):
        await phases.requests(target, plan.profile_requests, plan.concurrency, plan.request_timeout, "profile")
    return categorise(path)


def pct_of_cores(cpu_ns: float, since: float) -> float:
    """`cpu_ns` of CPU time since `since` (time.monotonic()), as a share of all the machine's cores."""
    return 100 * cpu_ns / ((time.monotonic() - since) * 1e9 * (os.cpu_count() or 1))


def ours(target: Target) -> int:
    """CPU time of the processes this run measures: proxy (and its redis-server), bench upstream,
    load generator."""
    return target.proxy_cpu() + target.storage_cpu() + target.upstream_server.cpu_ns() + phases.client_cpu()


async def measure_capacity(name: str, workdir: Path, plan: Plan) -> tuple[list[Level], list[phases.Failure]]:
    with Running(name, workdir, plan) as target:
        levels = await phases.bounded(
            phases.capacity(
                target,
                list(plan.capacity_levels),
                plan.delay_ms,
                plan.jitter_limit_ms,
                plan.request_timeout,
                plan.open_rate,
                plan.steady_seconds,
                log,
            ),
            PHASE_LIMIT_SECONDS * 2,
        )
    return levels, target.failures


async def measure_workers(workdir: Path, plan: Plan, count: int) -> tuple[Metrics, list[phases.Failure]]:
    """Relayed requests per second from `serve --workers count`, with sessions and limits in Redis
    (as several workers need), at the load phase's concurrency."""
    servers: list[Server] = []
    try:
        upstream = start_upstream(workdir)
        servers.append(upstream)
        redis = start_redis(workdir)
        servers.append(redis)
        proxy = start_bff(workdir, upstream.port, storage_env(redis), f"bff-{count}w", workers=count)
        servers.append(proxy)
        endpoint, upstream_endpoint = Endpoint("127.0.0.1", proxy.port), Endpoint("127.0.0.1", upstream.port)
        target = Target("bff", endpoint, upstream_endpoint, upstream, proxy, redis)
        busy_before, started = machine_busy_ns(), time.monotonic()
        load = await phases.bounded(
            phases.requests(target, plan.requests, plan.concurrency, plan.request_timeout, "w"), PHASE_LIMIT_SECONDS
        )
        row: Metrics = {
            "workers": count,
            "per_s": load["w_per_s"],
            "cpu_us": load["w_cpu_us"],
            "machine_busy_pct": pct_of_cores(machine_busy_ns() - busy_before, started),
        }
        return row, target.failures
    finally:
        for server in reversed(servers):
            server.stop()


async def measure_pool(name: str, workdir: Path, plan: Plan) -> tuple[Metrics, list[phases.Failure]]:
    """Idle time to first byte of `name` against an upstream `plan.pool_rtt_ms` away (mint answers and
    first bytes both wait that long), where the mint round trip the token pool saves is worth having."""
    with Running(name, workdir, replace(plan, upstream_rtt_ms=plan.pool_rtt_ms)) as target:
        idle, _ = await phases.bounded(
            phases.idle_ttfb(target, plan.pool_requests, plan.idle_warmup, plan.request_timeout), PHASE_LIMIT_SECONDS
        )
        row: Metrics = {"ttfb_p50_ms": idle["idle_ttfb_p50_ms"], "ttfb_p99_ms": idle["idle_ttfb_p99_ms"]}
        return row, target.failures


async def recorded(
    failures: list[phases.Failure], target: str, phase: str, topic: str, work: Awaitable[tuple[R, list[phases.Failure]]]
) -> R | None:
    """What `work` measured, its failures added to `failures`; None, with one failure more, if it raised."""
    try:
        result, seen = await work
    except MEASURE_ERRORS as exc:
        failures.append(phases.Failure(target, phase, topic, f"{type(exc).__name__}: {exc}"))
        return None
    failures += seen
    return result


def rotated(names: list[str], repeat: int) -> list[str]:
    """`names` in the order of this repeat: each starts first once, so no target always runs first."""
    start = repeat % len(names) if names else 0
    return names[start:] + names[:start]


def self_check() -> None:
    """The byte check must catch a wrong body, or a passing bench-quick proves nothing."""
    shape = StreamShape(chunks=3, delay_ms=0, size=24)
    probe = Target("probe", Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 1), None, None)  # type: ignore[arg-type]
    good = Exchange(status=200, done_at=1.0)
    good.body += b"".join(expected_chunks("t", 3, 24))
    corrupted = Exchange(status=200, done_at=1.0)
    corrupted.body += bytes(good.body[:-1]) + b"!"
    short = Exchange(status=200, done_at=1.0)
    short.body += bytes(good.body[:-24])
    assert probe.check("self", "t", good, shape)
    assert not probe.check("self", "t", corrupted, shape)
    assert not probe.check("self", "t", short, shape)


def machine() -> dict[str, str]:
    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"

    def package(name: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            return installed(name)
        except PackageNotFoundError:
            return "-"

    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    nginx = nginx_binary()
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": version(["node", "--version"]),
        "nginx": version([nginx, "-v"]).split("/")[-1] if nginx else "missing",
        "libraries": ", ".join(
            f"{name} {package(name)}"
            for name in ("starlette", "httpx", "httpcore", "uvicorn", "uvloop", "httptools", "aiohttp")
        ),
        "commit": commit + (" (with uncommitted changes)" if dirty not in ("?", "missing") else ""),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def plan_from(args: argparse.Namespace) -> Plan:
    targets = tuple(args.targets.split(",")) if args.targets else TARGETS if args.quick else DEFAULT_TARGETS
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise SystemExit(f"unknown target(s): {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    plan = Plan(quick=args.quick, repeats=args.repeats or (1 if args.quick else 3), targets=targets)
    if args.quick:
        plan = replace(plan, **QUICK)  # type: ignore[arg-type]
    if args.streams:
        plan = replace(plan, streams=args.streams)
    if args.no_capacity:
        plan = replace(plan, capacity_levels=())
    if args.no_workers:
        plan = replace(plan, worker_counts=())
    if args.no_pool:
        plan = replace(plan, pool_requests=0)
    if args.no_relay_profile:
        plan = replace(plan, profile_requests=0)
    if args.capacity_levels:
        plan = replace(plan, capacity_levels=tuple(int(n) for n in args.capacity_levels.split(",")))
    if args.rtt_ms:
        plan = replace(plan, upstream_rtt_ms=args.rtt_ms)
    return plan


async def run(
    plan: Plan, workroot: Path, profiles: Path | None = None
) -> tuple[dict[str, TargetResults], list[phases.Failure]]:
    results = {name: TargetResults() for name in plan.targets}
    failures: list[phases.Failure] = []
    runnable = []
    for name in plan.targets:
        reason = available(name)
        if reason is None:
            runnable.append(name)
            continue
        results[name].skipped = reason
        if os.environ.get("CI") == "true":
            failures.append(phases.Failure(name, "setup", "-", reason))
        log(f"skipping {name}: {reason}")
    for repeat in range(plan.repeats):
        for name in rotated(runnable, repeat):
            log(f"repeat {repeat + 1}/{plan.repeats}: {name}")
            started = time.monotonic()
            try:
                failures += await measure(name, workroot / f"r{repeat}-{name}", plan, results[name], profiles)
            except MEASURE_ERRORS as exc:
                failures.append(phases.Failure(name, "run", "-", f"{type(exc).__name__}: {exc}"))
                log(f"  {name} failed: {type(exc).__name__}: {exc}")
                continue
            got = results[name].repeats[-1]
            log(
                f"  {time.monotonic() - started:5.1f} s; idle TTFB p50 {fmt(got.get('idle_ttfb_p50_ms'))} ms, "
                f"CPU/request {fmt(got.get('req_cpu_us'))} us, CPU/chunk {fmt(got.get('held_cpu_chunk_us'))} us, "
                f"{plan.streams} streams TTFB p99 {fmt(got.get('st_ttfb_p99_ms'))} ms, "
                f"gap p99 {fmt(got.get('st_gap_p99_ms'))} ms"
            )
    for name in runnable if plan.capacity_levels else []:
        log(f"capacity: {name}")
        search = measure_capacity(name, workroot / f"capacity-{name}", plan)
        results[name].capacity = await recorded(failures, name, "capacity", "-", search) or []
    worker_counts = plan.worker_counts if "bff" in runnable else ()
    if worker_counts and available("bff-redis") is not None:
        log(f"skipping the workers phase: {REDIS_MISSING}")
        if os.environ.get("CI") == "true":
            failures.append(phases.Failure("bff", "workers", "-", REDIS_MISSING))
        worker_counts = ()
    for repeat in range(plan.repeats) if worker_counts else []:
        for count in worker_counts:
            log(f"workers: bff with --workers {count}, repeat {repeat + 1}/{plan.repeats}")
            work = measure_workers(workroot / f"workers-{count}-r{repeat}", plan, count)
            if (row := await recorded(failures, "bff", "workers", str(count), work)) is not None:
                results["bff"].workers.append(row)
    pool_targets = [name for name in POOL_TARGETS if available(name) is None] if plan.pool_requests else []
    for repeat in range(plan.repeats) if "bff" in runnable else []:
        for name in rotated(pool_targets, repeat):
            log(f"token pool: {name}, upstream {plan.pool_rtt_ms:g} ms away, repeat {repeat + 1}/{plan.repeats}")
            work = measure_pool(name, workroot / f"pool-{name}-r{repeat}", plan)
            if (row := await recorded(failures, name, "pool", "-", work)) is not None:
                results.setdefault(name, TargetResults()).pool.append(row)
    for result in results.values():
        result.distributions = {key: thin(values) for key, values in result.distributions.items()}
    return results, failures


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def save(
    path: Path,
    plan: Plan,
    info: dict[str, str],
    results: dict[str, TargetResults],
    failures: list[phases.Failure],
    seconds: float,
) -> None:
    data: dict[str, Any] = {
        "seconds": seconds,
        "plan": asdict(plan),
        "machine": info,
        "bff_env": BFF_BENCH_ENV,
        "targets": {
            name: {
                "skipped": result.skipped,
                "repeats": result.repeats,
                "capacity": [asdict(level) for level in result.capacity],
                "workers": result.workers,
                "pool": result.pool,
                "profile": result.profile,
                "profile_skipped": result.profile_skipped,
                "redis_commands": result.redis_commands,
                "distributions": result.distributions,
            }
            for name, result in results.items()
        },
        "failures": [failure.as_dict() for failure in failures],
    }
    path.write_text(json.dumps(data, indent=1))


def load(path: Path) -> tuple[Plan, dict[str, str], dict[str, TargetResults], list[phases.Failure], float]:
    """A saved run (results.json), to render its report again without measuring."""
    data = json.loads(path.read_text())
    fields: dict[str, Any] = {key: tuple(v) if isinstance(v, list) else v for key, v in data["plan"].items()}
    plan = Plan(**fields)
    results = {
        name: TargetResults(
            repeats=saved["repeats"],
            distributions=saved["distributions"],
            capacity=[Level(**level) for level in saved["capacity"]],
            workers=saved.get("workers", []),
            pool=saved.get("pool", []),
            profile=saved.get("profile", []),
            profile_skipped=saved.get("profile_skipped"),
            redis_commands=saved.get("redis_commands", {}),
            skipped=saved["skipped"],
        )
        for name, saved in data["targets"].items()
    }
    failures = [phases.Failure(**failure) for failure in data["failures"]]
    return plan, data["machine"], results, failures, float(data.get("seconds", 0.0))


def render(path: Path, out: Path) -> int:
    from bench import report

    out.mkdir(parents=True, exist_ok=True)
    for written in report.write(out, *load(path)):
        log(f"wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small numbers; only checks that every byte arrives")
    parser.add_argument("--repeats", type=int, help="repeats per target (default 3; 1 with --quick)")
    parser.add_argument("--targets", help=f"comma list from {','.join(TARGETS)} (default: {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--streams", type=int, help="concurrent streams in the model-pace phase (default 1000)")
    parser.add_argument("--no-capacity", action="store_true", help="skip the streams-per-worker search")
    parser.add_argument("--no-workers", action="store_true", help="skip throughput against --workers 1 and 2")
    parser.add_argument("--no-pool", action="store_true", help="skip the token pool phase (upstream 50 ms away)")
    parser.add_argument(
        "--no-relay-profile", action="store_true", help="skip py-spying workflow-bff's relays after its phases"
    )
    parser.add_argument("--capacity-levels", help="stream counts to try, e.g. 500,1000,2000,4000")
    parser.add_argument("--rtt-ms", type=float, help="emulated upstream round trip before mint answers and first bytes")
    parser.add_argument("--out", type=Path, help="directory for results.json, PERFORMANCE.md and the plot")
    parser.add_argument("--docs", type=Path, help="also write PERFORMANCE.md and performance.png here")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and configs")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the Python proxies during the load phases (into --out)"
    )
    parser.add_argument("--render", type=Path, help="only rewrite the report of a saved results.json (into --docs)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, args.docs or args.out or args.render.parent)
    plan = plan_from(args)
    if plan.quick:
        self_check()
    raise_nofile_limit()
    workroot = Path(tempfile.mkdtemp(prefix="bff-bench-"))
    out = args.out or workroot / "out"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    info = machine()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            results, failures = runner.run(run(plan, workroot, out if args.profile else None))
        save(out / "results.json", plan, info, results, failures, time.monotonic() - started)
        from bench import report

        written = report.write(out, plan, info, results, failures, time.monotonic() - started)
        if args.docs is not None:
            args.docs.mkdir(parents=True, exist_ok=True)
            for path in written:
                shutil.copy(path, args.docs / path.name)
        log(report.console_summary(plan, results))
        for path in sorted(out.glob("profile-*.txt")) if args.profile else []:
            log(summarize(path))
    finally:
        if args.keep:
            log(f"logs, configs and results kept in {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    for failure in failures[:20]:
        log(f"FAILED {failure.target} {failure.phase} {failure.topic}: {failure.detail}")
    where = f"; results in {out}" if args.out or args.keep else ""
    if failures:
        log(f"bench: {len(failures)} failure(s){where}")
        return 1
    ran = [name for name in plan.targets if results[name].repeats]
    seconds = time.monotonic() - started
    log(f"bench: ok ({len(ran)} targets, every relayed body byte-exact; {seconds:.0f} s){where}")
    return 0


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
