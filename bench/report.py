"""Turn a bench run into docs/PERFORMANCE.md, a PNG plot and a console summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.phases import Failure
from bench.servers import BFF_BENCH_ENV, BFF_POOL_SIZE
from bench.stats import Spread

if TYPE_CHECKING:
    from bench.run import Plan, TargetResults

PLOT_NAME = "performance.png"
BUSY_MACHINE_PCT = 10.0  # above this share of the machine used by other work, the page says so
STEAL_PCT = 5.0  # above this share of CPU time taken by the hypervisor, the page says so
NEAR_LINEAR = 0.9  # "near-linear": each added worker adds at least 90% of what one worker does
COLORS = {
    "direct": "#7f7f7f",
    "nginx": "#2ca02c",
    "bare-aiohttp": "#1f77b4",
    "bare-httpx": "#9467bd",
    "bff": "#d62728",
    "bff-redis": "#8c564b",
    "bff-pool": "#ff7f0e",
    "bff-traced": "#e377c2",
}
TITLES = {
    "direct": "direct",
    "nginx": "nginx",
    "bare-aiohttp": "bare aiohttp",
    "bare-httpx": "bare httpx",
    "bff": "workflow-bff",
    "bff-redis": "workflow-bff, Redis",
    "bff-pool": "workflow-bff, token pool",
    "bff-traced": "workflow-bff, tracing on",
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    digits: int = 1


def rows(plan: Plan) -> list[tuple[str, list[Row]]]:
    n, c, low = plan.streams, plan.concurrency, plan.low_concurrency
    return [
        (
            "CPU of the proxy process (µs)",
            [
                Row("low_cpu_us", f"per relayed request (1-chunk stream, concurrency {low})", 0),
                Row("req_cpu_us", f"per relayed request (1-chunk stream, concurrency {c})", 0),
                Row("req_cpu_stat_us", "the same from utime+stime in /proc/<pid>/stat (10 ms ticks)", 0),
                Row("held_cpu_chunk_us", f"per relayed chunk, up to {n} streams held open at model pace (steady)"),
                Row("st_cpu_chunk_all_us", f"per relayed chunk, {n} streams opened at once (incl. opening them)"),
            ],
        ),
        (
            "Time to first byte (ms)",
            [
                Row("idle_ttfb_p50_ms", "idle, p50", 2),
                Row("idle_ttfb_p99_ms", "idle, p99", 2),
                Row("low_ttfb_p50_ms", f"concurrency {low}, p50"),
                Row("low_ttfb_p99_ms", f"concurrency {low}, p99"),
                Row("req_ttfb_p50_ms", f"concurrency {c}, p50"),
                Row("req_ttfb_p99_ms", f"concurrency {c}, p99"),
                Row("st_ttfb_p50_ms", f"{n} streams opened at once, p50"),
                Row("st_ttfb_p99_ms", f"{n} streams opened at once, p99"),
            ],
        ),
        (
            f"{n} streams of {plan.stream_chunks} chunks at model pace (a chunk every {plan.delay_ms:g} ms), "
            "opened at once",
            [
                Row("st_connect_p99_ms", "TCP connect p99 (ms): the proxy's accept queue"),
                Row("st_gap_p50_ms", "inter-chunk gap p50 (ms)"),
                Row("st_gap_p99_ms", "inter-chunk gap p99 (ms)"),
                Row("st_jitter_p99_ms", "jitter p99: gap minus pace, absolute (ms)"),
                Row("st_delivery_p99_ms", "chunk delivery delay p99, upstream write → client (ms)"),
            ],
        ),
        (
            f"Up to {n} open-ended streams held open together (steady state)",
            [
                Row("held_streams", "streams held open", 0),
                Row("held_open_s", f"time to open them all, {plan.held_opening} at a time (s)", 2),
                Row("held_gap_p99_ms", "inter-chunk gap p99 (ms)"),
                Row("held_jitter_p99_ms", "jitter p99: gap minus pace, absolute (ms)"),
                Row("held_kb_per_stream", "memory per open stream (KB, RSS growth / streams)"),
                Row("held_chunks_per_s", "chunks relayed per second", 0),
                Row("held_drain_ms", "until the upstream saw every stream closed after the clients left (ms)", 0),
            ],
        ),
        (
            "Load and connections",
            [
                Row("low_per_s", f"relayed requests per second (concurrency {low})", 0),
                Row("req_per_s", f"relayed requests per second (concurrency {c})", 0),
                Row("req_upstream_connections", f"upstream connections opened (concurrency {c})", 0),
                Row("req_upstream_requests", f"upstream requests (concurrency {c})", 0),
                Row("req_reuse_pct", f"upstream requests on a reused connection (%, concurrency {c})"),
                Row("token_p50_ms", "token mint p50 (ms): POST /api/token; direct: the upstream mint", 2),
                Row("token_p99_ms", "token mint p99 (ms)", 2),
            ],
        ),
        (
            "The rest of the machine, to show it is not the bottleneck",
            [
                Row("req_upstream_cpu_us", f"bench upstream CPU per request (µs, concurrency {c})", 0),
                Row("held_upstream_cpu_chunk_us", "bench upstream CPU per chunk (µs, streams held open)"),
                Row("req_client_cpu_us", f"load generator CPU per request (µs, concurrency {c})", 0),
                Row("held_client_cpu_chunk_us", "load generator CPU per chunk (µs, streams held open)"),
                Row("held_storage_cpu_chunk_us", "redis-server CPU per chunk (µs, streams held open)"),
                Row("other_cpu_pct", "CPU used by anything else on the machine (% of all cores)"),
                Row("steal_pct", "CPU time the hypervisor gave to other machines (steal, % of all cores)"),
            ],
        ),
    ]


def spread(results: dict[str, TargetResults], target: str, key: str) -> Spread | None:
    result = results.get(target)
    return Spread.of(repeat.get(key) for repeat in result.repeats) if result else None


def median(results: dict[str, TargetResults], target: str, key: str) -> float | None:
    found = spread(results, target, key)
    return found.median if found else None


def number(value: float, digits: int) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cell(value: Spread | None, digits: int) -> str:
    if value is None:
        return "–"
    text = number(value.median, digits)
    if value.count > 1 and value.high != value.low:
        text += f" <sub>{number(value.low, digits)}–{number(value.high, digits)}</sub>"
    return text


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def difference(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    return f"{a - b:+.2f}" if abs(a - b) < 10 else f"{a - b:+.0f}"


def ran(plan: Plan, results: dict[str, TargetResults]) -> list[str]:
    return [name for name in plan.targets if results[name].repeats]


# The goals' measures taken on the floors too, where they apply: a goal the floors miss as well is
# beyond what this harness can show for any relay, not only for workflow-bff.
FLOORS = ("bare-aiohttp", "direct")
# workflow-bff with its state in Redis: every goal's measure is reported for it, none is judged.
REDIS = "bff-redis"


@dataclass(frozen=True)
class Goal:
    label: str
    measure: Callable[[str], float | None]  # the value for one target
    unit: str
    limit: float
    at_most: bool = True  # the value must stay at or below the limit (else at or above)
    floors: tuple[str, ...] = ()  # of FLOORS, those the measure means something for
    per_target: bool = True  # False: one figure for workflow-bff alone (workers, token pool), none for REDIS

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


def goals(plan: Plan, results: dict[str, TargetResults]) -> list[tuple[str, dict[str, str], bool | None]]:
    """Issue 7's targets and the runs': the label, the values of workflow-bff, of workflow-bff with
    Redis and of the floors (formatted, by target), and whether workflow-bff meets it."""

    def m(key: str) -> Callable[[str], float | None]:
        return lambda target: median(results, target, key)

    def over(key: str, base: str) -> Callable[[str], float | None]:
        return lambda target: divide(median(results, target, key), median(results, base, key))

    def divide(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def subtract(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    n = plan.streams
    held = median(results, "bff", "held_streams")
    at = f" (bff held {held:.0f} of {n} streams)" if held is not None and held < n else ""
    bare, both = ("bare-aiohttp",), FLOORS
    measured = [
        Goal(f"CPU per relayed chunk at model pace ≤ 2.5× nginx{at}", over("held_cpu_chunk_us", "nginx"), "×", 2.5,
             floors=bare),
        Goal(f"CPU per relayed request ≤ 1.5× the bare aiohttp relay (concurrency {plan.low_concurrency})",
             over("low_cpu_us", "bare-aiohttp"), "×", 1.5),
        Goal(f"CPU per relayed request ≤ 1.5× the bare aiohttp relay (concurrency {plan.concurrency})",
             over("req_cpu_us", "bare-aiohttp"), "×", 1.5),
        Goal("added time to first byte p50 ≤ 1 ms over direct, idle",
             lambda t: subtract(median(results, t, "idle_ttfb_p50_ms"), median(results, "direct", "idle_ttfb_p50_ms")),
             " ms", 1.0, floors=bare),
        Goal(f"{n} streams: time to first byte p99 ≤ 50 ms", m("st_ttfb_p99_ms"), " ms", 50, floors=both),
        Goal(f"{n} streams: inter-chunk gap p99 ≤ 60 ms", m("st_gap_p99_ms"), " ms", 60, floors=both),
        Goal(f"{n} streams: ≤ 30 KB per open stream{at}", m("held_kb_per_stream"), " KB", 30, floors=bare),
        Goal("≥ 90% of upstream requests on reused connections", m("req_reuse_pct"), " %", 90, at_most=False,
             floors=bare),
        # The runs: every relay appends to a chunk log that its response follows.
        Goal(f"runs, log in memory: CPU per relayed chunk at model pace ≤ 1.1× the bare aiohttp relay{at}",
             over("held_cpu_chunk_us", "bare-aiohttp"), "×", 1.1),
        Goal(f"runs: {n} streams opened at once, CPU per relayed chunk ≤ 1.0× the bare aiohttp relay",
             over("st_cpu_chunk_all_us", "bare-aiohttp"), "×", 1.0),
        Goal(f"runs: {n} streams opened at once, inter-chunk gap p99 ≤ the bare aiohttp relay's",
             over("st_gap_p99_ms", "bare-aiohttp"), "×", 1.0),
    ]  # fmt: skip
    most, factor = scaling(results) or (max(plan.worker_counts, default=2), None)
    measured.append(
        Goal(f"throughput grows near-linearly with workers (≥ {NEAR_LINEAR * most:g}× one worker's at {most})",
             lambda _: factor, "×", NEAR_LINEAR * most, at_most=False, per_target=False)
    )  # fmt: skip
    direct, minting, pooled = (pool_p50(results, name) for name in ("direct", "bff", "bff-pool"))
    if direct is not None and (minting is not None or pooled is not None):
        rtt = plan.pool_rtt_ms
        measured += [
            Goal(f"with the token pool, idle TTFB p50 within 5% of direct (upstream {rtt:g} ms away)",
                 lambda _: divide(pooled, direct), "×", 1.05, per_target=False),
            Goal(f"without the pool, about one round trip ({rtt:g} ms) more than direct",
                 lambda _: subtract(minting, direct), " ms", 1.5 * rtt, per_target=False),
        ]  # fmt: skip

    def shown(goal: Goal, value: float | None) -> str:
        return "–" if value is None else f"{number(value, 3 if goal.unit == '×' else 2)}{goal.unit}"

    table = []
    for goal in measured:
        value = goal.measure("bff")
        values = {"bff": shown(goal, value), REDIS: shown(goal, goal.measure(REDIS)) if goal.per_target else "–"}
        values |= {floor: shown(goal, goal.measure(floor)) if floor in goal.floors else "–" for floor in FLOORS}
        table.append((goal.label, values, None if value is None else goal.met(value)))
    return table


def pool_spread(results: dict[str, TargetResults], target: str, key: str) -> Spread | None:
    """`key` of the token pool phase for `target`, over the repeats."""
    result = results.get(target)
    return Spread.of(row.get(key) for row in result.pool) if result else None


def pool_p50(results: dict[str, TargetResults], target: str) -> float | None:
    found = pool_spread(results, target, "ttfb_p50_ms")
    return found.median if found else None


def by_workers(result: TargetResults | None, key: str) -> dict[int, Spread]:
    """`key` of the workers phase, by worker count, over the repeats."""
    rows = result.workers if result else []
    counts = sorted({int(row["workers"] or 0) for row in rows})
    found = {n: Spread.of(row.get(key) for row in rows if row["workers"] == n) for n in counts}
    return {n: spread for n, spread in found.items() if spread is not None}


def scaling(results: dict[str, TargetResults]) -> tuple[int, float | None] | None:
    """The most workers measured, and their throughput as a multiple of one worker's."""
    per_s = by_workers(results.get("bff"), "per_s")
    if 1 not in per_s or len(per_s) < 2:
        return None
    most = max(per_s)
    return most, per_s[most].median / per_s[1].median


def capacity_text(result: TargetResults, limit_ms: float) -> str:
    if not result.capacity:
        return "–"
    held = [level for level in result.capacity if level.holds(limit_ms)]
    parts = []
    for level in result.capacity:
        jitter = "no steady window" if level.jitter_p99_ms is None else f"{level.jitter_p99_ms:.1f} ms"
        failed = f", {level.failed} failed" if level.failed else ""
        parts.append(f"{level.streams}: {jitter}{failed}")
    best = f"**{held[-1].streams}**" if held else "**< " + str(result.capacity[0].streams) + "**"
    if held and held[-1] is result.capacity[-1]:
        best = f"**≥ {held[-1].streams}**"
    return f"{best} ({'; '.join(parts)})"


def markdown(
    plan: Plan,
    info: dict[str, str],
    results: dict[str, TargetResults],
    failures: list[Failure],
    seconds: float,
    baseline: dict[str, Any] | None = None,
) -> str:
    """The page; `baseline` is bench/baseline-issue20.json unless given."""
    names = ran(plan, results)
    header = "| | " + " | ".join(TITLES[name] for name in names) + " |"
    rule = "|---|" + "---:|" * len(names)
    out = [
        "# Performance",
        "",
        f"Generated by `{'make bench-quick' if plan.quick else 'make bench'}` (bench/run.py) on {info['date']}, "
        f"commit {info['commit']}, in {seconds / 60:.1f} minutes. Rerun it to refresh this page: absolute numbers "
        "belong to this machine, the ratios between targets travel better.",
        "",
        "The targets relay the same streams from the same fast upstream, each measured in the same run:",
        "",
        "- **direct**: the client talks to the upstream itself (no proxy; the floor).",
        "- **nginx**: `proxy_pass` with `proxy_buffering off` and a keep-alive upstream pool, one worker "
        "(config generated by bench/servers.py). The reference proxy.",
        "- **bare aiohttp** (and **bare httpx**, with `--targets`): a bare Starlette relay with that client "
        "(bench/bare_relay.py): no sessions, no middleware, no token mint. The floor for a Python relay with "
        "each library.",
        "- **workflow-bff**: `python -m proxy serve`, one worker, its full production middleware stack; a "
        "signed-in guest session and `X-CSRF: 1` on `POST /api/workflows/{alias}/stream`. Per relayed request "
        "it mints a token upstream (one extra round trip, by design) and then opens the stream. Each relay is "
        "a run: the run appends the upstream's chunks to a chunk log in memory, and the response follows the "
        "log (everything waiting in one send when it is behind).",
        "- **workflow-bff, Redis**: the same with `BFF_STORAGE_URL` at a local redis-server started for it: "
        "sessions and limits live there, and every run's log, still kept in memory for its own response, is "
        "mirrored to a Redis stream by one writer per replica (so other replicas can follow it). The proxy's CPU "
        "and memory are its own; redis-server's CPU is shown apart.",
        "",
        f"Medians of {plan.repeats} repeat(s), smallest–largest in small print. Every target starts afresh for "
        "each repeat, in a rotated order. Every relayed body is checked byte for byte.",
        "",
        f"![Time to first byte and CPU per relayed chunk, by target]({PLOT_NAME})",
        "",
    ]

    def overall(key: str) -> Spread | None:
        return Spread.of(repeat.get(key) for result in results.values() for repeat in result.repeats)

    warnings = []
    busy, stolen = overall("other_cpu_pct"), overall("steal_pct")
    if busy is not None and busy.median > BUSY_MACHINE_PCT:
        warnings.append(
            f"> **Other work used {busy.median:.0f}% of this machine's CPU during the run** (median over targets, "
            f"up to {busy.high:.0f}%): absolute numbers, and the tails most of all, are worse than on a quiet "
            "machine. Rerun `make bench` with nothing else running before quoting them."
        )
    if stolen is not None and stolen.high > STEAL_PCT:
        warnings.append(
            f"> **This virtual machine's host took up to {stolen.high:.0f}% of its CPU time during the run** "
            f"(steal; median over targets {stolen.median:.0f}%). Work measures slower while that happens, so "
            "repeats differ more than usual; compare targets within a repeat before comparing runs."
        )
    out[-2:-2] = [line for warning in warnings for line in (warning, "")]
    from bench import report_cost
    from bench.baseline import load as load_baseline

    out += report_cost.sections(plan, results, load_baseline() if baseline is None else baseline)
    if "bff" in names:
        others = ([REDIS] if REDIS in names else []) + list(FLOORS)
        out += [
            "## Targets for workflow-bff",
            "",
            "Issue 7's targets, then the runs'. workflow-bff (its state in memory) is judged; with its state in "
            "Redis the same measure is reported beside it, not judged. The last columns take the same measure "
            "on the floors, where it applies. The bare aiohttp relay has no sessions, limits, token mint or run "
            "log: a target it misses too is beyond a Python relay on this machine, not only workflow-bff. One "
            "that direct misses is beyond this harness, whose load generator and upstream share the machine's "
            "cores with the proxy.",
            "",
            f"| target | workflow-bff | met | {' | '.join(TITLES[name] for name in others)} |",
            "|---|---:|:---:|" + "---:|" * len(others),
        ]
        for label, values, met in goals(plan, results):
            verdict = "–" if met is None else "yes" if met else "**no**"
            out.append(f"| {label} | {values['bff']} | {verdict} | " + " | ".join(values[o] for o in others) + " |")
        out.append("")
    out += ["## Results", ""]
    for title, group in rows(plan):
        out += [f"**{title}**", "", header, rule]
        for row in group:
            cells = [cell(spread(results, name, row.key), row.digits) for name in names]
            if all(value == "–" for value in cells):
                continue
            out.append(f"| {row.label} | " + " | ".join(cells) + " |")
        out.append("")
    out += _ratios(plan, results, names)
    if "bff" in names:
        out += _ttfb_breakdown(results)
    if plan.capacity_levels:
        out += [
            "## Streams one worker holds",
            "",
            f"Most concurrent streams at model pace (a chunk every {plan.delay_ms:g} ms) with inter-chunk jitter "
            f"p99 under {plan.jitter_limit_ms:g} ms and no failed stream. Streams open at {plan.open_rate:g} per "
            f"second and all stay open together for about {plan.steady_seconds:g} s; jitter is taken over that "
            "window. Levels tried in order (jitter p99 at each); the search stops at the first level that does "
            "not hold. The direct row is the ceiling of this harness on this machine: the load generator and "
            "the upstream share its two cores with the proxy.",
            "",
            "| target | streams held |",
            "|---|---|",
        ]
        for name in names:
            out.append(f"| {TITLES[name]} | {capacity_text(results[name], plan.jitter_limit_ms)} |")
        out.append("")
    out += _workers(plan, results)
    out += _pool(plan, results)
    skipped = [f"{TITLES[name]}: {result.skipped}" for name, result in results.items() if result.skipped]
    if skipped or failures:
        out += ["## Failures and skipped targets", ""]
        out += [f"- skipped {line}" for line in skipped]
        out += [f"- {f.target} {f.phase} {f.topic}: {f.detail}" for f in failures[:30]]
        if len(failures) > 30:
            out.append(f"- … and {len(failures) - 30} more")
        out.append("")
    out += _method(plan, info)
    return "\n".join(out) + "\n"


def _ratios(plan: Plan, results: dict[str, TargetResults], names: list[str]) -> list[str]:
    def m(name: str, key: str) -> float | None:
        return median(results, name, key)

    n = plan.streams
    # (label, metric, reference target, ratio or difference)
    comparisons = [
        (f"CPU per request ÷ nginx, concurrency {plan.low_concurrency}", "low_cpu_us", "nginx", ratio),
        (f"CPU per request ÷ nginx, concurrency {plan.concurrency}", "req_cpu_us", "nginx", ratio),
        (f"CPU per request ÷ bare aiohttp, concurrency {plan.low_concurrency}", "low_cpu_us", "bare-aiohttp", ratio),
        (f"CPU per request ÷ bare aiohttp, concurrency {plan.concurrency}", "req_cpu_us", "bare-aiohttp", ratio),
        ("CPU per chunk ÷ nginx", "held_cpu_chunk_us", "nginx", ratio),
        ("CPU per chunk ÷ bare aiohttp", "held_cpu_chunk_us", "bare-aiohttp", ratio),
        ("memory per stream ÷ nginx", "held_kb_per_stream", "nginx", ratio),
        ("added TTFB idle p50 (ms)", "idle_ttfb_p50_ms", "direct", difference),
        ("added TTFB idle p99 (ms)", "idle_ttfb_p99_ms", "direct", difference),
        (f"added TTFB, {n} streams, p50 (ms)", "st_ttfb_p50_ms", "direct", difference),
        (f"added TTFB, {n} streams, p99 (ms)", "st_ttfb_p99_ms", "direct", difference),
        ("added chunk delivery delay p99 (ms)", "st_delivery_p99_ms", "direct", difference),
    ]
    out = [
        "## Ratios",
        "",
        "CPU against nginx and against the bare aiohttp relay (the proxy process only); time to first byte "
        "as milliseconds added over direct.",
        "",
        "| | " + " | ".join(TITLES[name] for name in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, key, reference, compare in comparisons:
        cells = [compare(m(name, key), m(reference, key)) for name in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _workers(plan: Plan, results: dict[str, TargetResults]) -> list[str]:
    result = results.get("bff")
    per_s, cpu, busy = (by_workers(result, key) for key in ("per_s", "cpu_us", "machine_busy_pct"))
    if not per_s:
        return []
    one = per_s[1].median if 1 in per_s else None
    out = [
        "## Throughput against workers",
        "",
        f"`python -m proxy serve --workers N` with sessions and limits in a local redis-server (several "
        f"workers need shared storage), {plan.requests} one-chunk streams from {plan.concurrency} keep-alive "
        "clients, as in the load phase. CPU per request is summed over every worker. The machine's busy "
        "share says how much of its cores everything (load generator, upstream, Redis, workers) used: "
        "workers can only add throughput while cores are left.",
        "",
        "| workers | relayed requests per second | × one worker | CPU per request (µs) | machine busy (% of cores) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(per_s):
        factor = f"{per_s[n].median / one:.2f}×" if one else "–"
        out.append(f"| {n} | {cell(per_s[n], 0)} | {factor} | {cell(cpu.get(n), 0)} | {cell(busy.get(n), 0)} |")
    most = max(cpu, default=1)
    if 1 in cpu and most > 1:
        out += [
            "",
            f"With {most} workers each request cost {cpu[most].median / cpu[1].median:.2f}× the CPU it cost with "
            "one: near 1.00× means the workers do not slow each other, so throughput grows with workers for as "
            "long as there are free cores to run them.",
        ]
    return [*out, ""]


def _pool(plan: Plan, results: dict[str, TargetResults]) -> list[str]:
    names = [name for name in ("direct", "bff", "bff-pool") if pool_spread(results, name, "ttfb_p50_ms")]
    direct = pool_p50(results, "direct")
    if not names:
        return []
    out = [
        f"## The token pool, with the upstream {plan.pool_rtt_ms:g} ms away",
        "",
        f"Idle time to first byte ({plan.pool_requests} one-chunk streams one after another) against a bench "
        f"upstream that waits {plan.pool_rtt_ms:g} ms before each mint answer and each first byte, as an "
        "upstream across a WAN would. direct already holds a token; workflow-bff mints one per relay (a "
        f"round trip before the stream request); with `BFF_TOKEN_POOL={BFF_POOL_SIZE}` it takes a pre-minted one.",
        "",
        "| | " + " | ".join(TITLES[name] for name in names) + " |",
        "|---|" + "---:|" * len(names),
        "| time to first byte p50 (ms) | "
        + " | ".join(cell(pool_spread(results, name, "ttfb_p50_ms"), 1) for name in names)
        + " |",
        "| time to first byte p99 (ms) | "
        + " | ".join(cell(pool_spread(results, name, "ttfb_p99_ms"), 1) for name in names)
        + " |",
        "| p50 ÷ direct | " + " | ".join(ratio(pool_p50(results, name), direct) for name in names) + " |",
    ]
    return [*out, ""]


def _ttfb_breakdown(results: dict[str, TargetResults]) -> list[str]:
    def c(target: str, key: str) -> str:
        return cell(spread(results, target, key), 2)

    return [
        "## Where workflow-bff's time to first byte goes (idle, p50, ms)",
        "",
        "The bench upstream stamps when each request reaches it (CLOCK_MONOTONIC, the clock the load "
        "generator reads), which splits the time to first byte into the request leg and the relay leg.",
        "",
        "| leg | direct | nginx | workflow-bff |",
        "|---|---:|---:|---:|",
        f"| client sends → token mint reaches the upstream | – | – | {c('bff', 'idle_to_mint_p50_ms')} |",
        f"| mint reaches the upstream → stream request reaches it (the mint round trip) | – | – | "
        f"{c('bff', 'idle_mint_to_stream_p50_ms')} |",
        f"| client sends → stream request reaches the upstream | {c('direct', 'idle_request_leg_p50_ms')} | "
        f"{c('nginx', 'idle_request_leg_p50_ms')} | {c('bff', 'idle_request_leg_p50_ms')} |",
        f"| stream request reaches the upstream → first byte at the client (relay leg) | "
        f"{c('direct', 'idle_response_leg_p50_ms')} | {c('nginx', 'idle_response_leg_p50_ms')} | "
        f"{c('bff', 'idle_response_leg_p50_ms')} |",
        f"| total | {c('direct', 'idle_ttfb_p50_ms')} | {c('nginx', 'idle_ttfb_p50_ms')} | "
        f"{c('bff', 'idle_ttfb_p50_ms')} |",
        "",
    ]


def _method(plan: Plan, info: dict[str, str]) -> list[str]:
    env = " ".join(f'{name}="{value}"' for name, value in BFF_BENCH_ENV.items())
    return [
        "## Machine",
        "",
        f"- CPU: {info['cpu']}; kernel {info['kernel']}",
        f"- Python {info['python']}, Node.js {info['node']}, nginx {info['nginx']}",
        f"- {info['libraries']}",
        "- Everything on one machine over loopback: the load generator, the bench upstream and the proxy "
        "share its cores, so absolute numbers are pessimistic; each process's own CPU is measured apart.",
        "",
        "## How to reproduce",
        "",
        "```sh",
        "apt-get install -y nginx redis-server   # the reference proxy; Redis for bff-redis and --workers; node >= 18",
        "make bench                      # full run, a few minutes; rewrites docs/PERFORMANCE.md and the plot",
        "make bench-quick                # seconds; part of `make test`: every target relays byte-exact",
        ".venv/bin/python -m bench --help   # targets, repeats, stream counts, capacity levels, --no-pool, --rtt-ms",
        "```",
        "",
        "`make bench` also leaves the raw numbers in `bench/out/results.json` (not committed); "
        "`python -m bench --render bench/out/results.json --docs docs` redraws this page from them.",
        "",
        "## Method",
        "",
        "- **Upstream** (bench/upstream.mjs): a dependency-free Node.js server implementing the token mint and "
        "the stream of CONTRACT Part A. A stream's inputs choose its shape (`chunks`, `delay_ms`, `size`); chunk "
        f"*i* is `[topic:i]é` padded to {plan.chunk_size} bytes, written on a drift-free schedule. Tokens are "
        "single use. It counts accepted connections (connection reuse) and stamps request arrivals and chunk writes.",
        "- **Load generator** (bench/load.py): raw asyncio sockets on uvloop, parsed by httptools; each read is "
        "stamped before parsing. direct, nginx and the bare relays are handed upstream tokens beforehand (as a "
        "browser in token mode would hold one); workflow-bff gets guest sessions (`POST /auth/guest`).",
        "- **CPU** is time on CPU from `/proc/<pid>/task/*/schedstat` (nanoseconds; utime+stime in "
        "`/proc/<pid>/stat` has 10 ms ticks), summed over the proxy's process tree (nginx: master and worker).",
        f"- **Idle TTFB**: {plan.idle_requests} one-chunk streams one after another on a warm keep-alive "
        "connection, from the request's first byte sent to the first body byte received.",
        f"- **Per request**: {plan.low_requests} one-chunk streams from {plan.low_concurrency} keep-alive clients, "
        f"then {plan.requests} from {plan.concurrency}, each after a warm-up at the same concurrency; CPU per "
        "request = proxy CPU ÷ requests. Upstream connections opened "
        "during the measured requests show connection reuse (workflow-bff sends two upstream requests per "
        "relayed request: mint and stream).",
        f"- **Model pace**: {plan.streams} streams of {plan.stream_chunks} chunks, one every {plan.delay_ms:g} ms, "
        "each on its own connection, all opened at once; TTFB is counted from the connect. Inter-chunk gaps are "
        "per chunk at the client (two chunks in one read give a gap of 0). Chunk delivery delay is arrival at "
        "the client minus the upstream's write. These numbers include the burst of opening the streams.",
        f"- **Held open (steady state)**: {plan.streams} open-ended streams at the same pace, opened "
        f"{plan.held_opening} at a time (the next as soon as one has its first byte, so opening never overloads "
        f"the target; none starts opening after {plan.held_open_seconds:g} s, so a target that cannot carry them "
        "all is measured with those it holds; this phase runs before the burst, so RSS growth is not hidden by "
        f"memory a burst left behind); once every one has its first byte and {plan.held_settle_seconds:g} s passed, a "
        f"{plan.held_window_seconds:g} s window with nothing but relaying going on gives CPU per chunk (the "
        "proxy's CPU in the window ÷ chunks delivered in it), memory per open stream (highest RSS in the window "
        "minus the RSS before the phase, ÷ streams) and the steady inter-chunk gaps. Then the clients leave: "
        "every body must be a byte-exact prefix of its stream, and the upstream must see every stream closed.",
        "- **Token mint**: `POST /api/token` one at a time on a warm connection (workflow-bff); the upstream's "
        "own `GET /api/v1/token` for scale (direct).",
        *(
            [
                f"- **Upstream round trip**: the bench upstream waited {plan.upstream_rtt_ms:g} ms before answering "
                "each mint and before each stream's first byte (`--rtt-ms`)."
            ]
            if plan.upstream_rtt_ms
            else []
        ),
        *(
            [f"- **workflow-bff, token pool**: workflow-bff with `BFF_TOKEN_POOL={BFF_POOL_SIZE}` (pre-minted tokens)."]
            if "bff-pool" in plan.targets
            else []
        ),
        f"- workflow-bff runs with its defaults except {env}: limits it never reaches, so the bench is never "
        "refused (the limiter still runs on every request), and no resume grace, so a run stops as soon as "
        "its client leaves instead of generating on into the next phase.",
        "- The token pool section comes from its own phase (`--no-pool` skips it): direct, workflow-bff and "
        "workflow-bff with the pool, each started afresh with its own upstream, in a rotated order per repeat. "
        "`--targets bff-pool` adds the pool to every other phase too, and `--rtt-ms` moves every phase's "
        "upstream further away.",
        "",
    ]


def plot(path: Path, plan: Plan, results: dict[str, TargetResults]) -> bool:
    """TTFB distributions, inter-chunk gaps and CPU per request/chunk per target, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = ran(plan, results)
    figure, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    distributions = [
        ("idle_ttfb_ms", "Time to first byte, idle (ms)", axes[0][0], True),
        ("stream_ttfb_ms", f"Time to first byte, {plan.streams} streams at once (ms)", axes[0][1], True),
        ("held_gap_ms", f"Inter-chunk gap, {plan.streams} streams held open (ms)", axes[0][2], False),
    ]
    for key, title, axis, log_scale in distributions:
        for name in names:
            values = results[name].distributions.get(key) or []
            if not values:
                continue
            fractions = [(index + 1) / len(values) for index in range(len(values))]
            axis.plot(values, fractions, label=TITLES[name], color=COLORS[name], linewidth=2)
        axis.set_title(title)
        axis.set_ylabel("fraction of gaps" if key.endswith("gap_ms") else "fraction of requests")
        axis.grid(True, which="both", alpha=0.3)
        if log_scale:
            axis.set_xscale("log")
        else:
            # The pace is the dotted line; a gap of 0 is a chunk that arrived with the one before it.
            axis.axvline(plan.delay_ms, color="black", linestyle=":", linewidth=1)
            axis.set_xlim(0, plan.delay_ms * 5)
        axis.legend(loc="lower right")
    bars = [
        ("held_cpu_chunk_us", f"Proxy CPU per relayed chunk (µs), {plan.streams} streams held open", axes[1][0]),
        ("req_cpu_us", "Proxy CPU per relayed request (µs)", axes[1][1]),
        ("held_kb_per_stream", "Memory per open stream (KB)", axes[1][2]),
    ]
    for key, title, axis in bars:
        found = {name: spread(results, name, key) for name in names}
        spreads = {name: value for name, value in found.items() if value is not None}
        shown = list(spreads)
        medians = [v.median for v in spreads.values()]
        errors = [[v.median - v.low for v in spreads.values()], [v.high - v.median for v in spreads.values()]]
        positions = range(len(shown))
        axis.bar(positions, medians, yerr=errors, capsize=4, color=[COLORS[name] for name in shown])
        # The median goes under the name, clear of the error bars.
        labels = [f"{TITLES[name]}\n{number(v.median, 1)}" for name, v in spreads.items()]
        axis.set_xticks(list(positions), labels)
        axis.set_title(title)
        axis.grid(True, axis="y", alpha=0.3)
    figure.suptitle(
        f"workflow-bff vs nginx, bare relays and a direct connection — medians of {plan.repeats} repeat(s), "
        "bars show the range"
    )
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def write(
    out: Path,
    plan: Plan,
    info: dict[str, str],
    results: dict[str, TargetResults],
    failures: list[Failure],
    seconds: float,
) -> list[Path]:
    """PERFORMANCE.md and the plot into `out`; returns the files written."""
    written = []
    if plot(out / PLOT_NAME, plan, results):
        written.append(out / PLOT_NAME)
    page = out / "PERFORMANCE.md"
    page.write_text(markdown(plan, info, results, failures, seconds))
    written.append(page)
    return written


def console_summary(plan: Plan, results: dict[str, TargetResults]) -> str:
    keys = [
        ("idle_ttfb_p50_ms", "TTFB idle p50 ms"),
        ("req_cpu_us", "CPU/request µs"),
        ("held_cpu_chunk_us", "CPU/chunk µs"),
        ("st_ttfb_p99_ms", f"{plan.streams} streams TTFB p99 ms"),
        ("st_gap_p99_ms", "gap p99 ms"),
        ("held_kb_per_stream", "KB/stream"),
        ("req_reuse_pct", "reuse %"),
    ]
    names = ran(plan, results)
    width = max(len(label) for _, label in keys) + 2
    columns = [max(12, len(TITLES[name]) + 2) for name in names]
    lines = ["".ljust(width) + "".join(TITLES[name].rjust(c) for name, c in zip(names, columns, strict=True))]
    for key, label in keys:
        cells = ["–" if v is None else number(v, 1) for v in (median(results, name, key) for name in names)]
        lines.append(label.ljust(width) + "".join(cell.rjust(c) for cell, c in zip(cells, columns, strict=True)))
    return "\n".join(lines)
