"""The per-request cost sections of docs/PERFORMANCE.md (issue 20): the issue's summary table, its
targets with their verdicts, the Redis commands of one relay, and where each microsecond of a relay
goes, before the issue and now.

"Before" is bench/baseline-issue20.json (bench/baseline.py says where its numbers come from).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.profile import CATEGORIES, per_request
from bench.report import REDIS, TITLES, median, number

if TYPE_CHECKING:
    from bench.run import Plan, TargetResults

BARE, BFF = "bare-aiohttp", "bff"
WORSE_BY = 1.05  # per-chunk CPU and memory per stream: at most 5% worse than before the issue


@dataclass(frozen=True)
class Judged:
    """One target's row: a measure per target, the limit each of workflow-bff's two columns is judged
    against (a column without one is reported, not judged), and how values read."""

    label: str
    measure: Callable[[str], float | None]
    limits: Mapping[str, float]
    unit: str
    shown: Callable[[str, float], str] | None = None  # the cell's text, when more than the value
    reference: str = "–"  # the bare relay's own figure, for scale

    def cell(self, target: str) -> tuple[str, str]:
        """The value's text and the verdict ("yes", "**no**", or a dash when not judged or not measured)."""
        value = self.measure(target)
        if value is None:
            return "–", "–"
        text = self.shown(target, value) if self.shown else f"{number(value, 2)}{self.unit}"
        limit = self.limits.get(target)
        return text, "–" if limit is None else "yes" if value <= limit else "**no**"


def sections(plan: Plan, results: dict[str, TargetResults], baseline: dict[str, Any]) -> list[str]:
    """Markdown lines: nothing unless workflow-bff ran."""
    if not results.get(BFF) or not results[BFF].repeats:
        return []
    return [*_summary(plan, results), *_targets(plan, results, baseline), *_profile(plan, results, baseline)]


def _m(results: dict[str, TargetResults], target: str, key: str) -> float | None:
    return median(results, target, key) if target in results else None


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(plan: Plan, results: dict[str, TargetResults]) -> list[str]:
    names = [name for name in ("nginx", BARE, BFF, REDIS) if name in results and results[name].repeats]
    bare_cpu, bare_ttfb = _m(results, BARE, "req_cpu_us"), _m(results, BARE, "req_ttfb_p50_ms")
    direct = _m(results, "direct", "idle_ttfb_p50_ms")

    def with_ratio(value: float | None, bare: float | None, unit: str, digits: int, name: str) -> str:
        if value is None:
            return "–"
        ratio = _over(value, bare)
        shown = f"{number(value, digits)} {unit}"
        return f"{shown} ({ratio:.2f}×)" if ratio is not None and name.startswith("bff") else shown

    def added(name: str) -> str:
        idle = _m(results, name, "idle_ttfb_p50_ms")
        return "–" if idle is None or direct is None else f"+{idle - direct:.2f} ms"

    c = plan.concurrency
    return [
        "## Per-request cost (issue 20)",
        "",
        "The issue's table, from this run: workflow-bff against the bare aiohttp relay (one upstream request "
        "per relay where workflow-bff makes two, a mint and a stream), × the bare relay in brackets.",
        "",
        "| | " + " | ".join(TITLES[name] for name in names) + " |",
        "|---|" + "---:|" * len(names),
        f"| CPU per relayed request, concurrency {c} | "
        + " | ".join(with_ratio(_m(results, n, "req_cpu_us"), bare_cpu, "µs", 0, n) for n in names)
        + " |",
        f"| time to first byte p50, concurrency {c} | "
        + " | ".join(with_ratio(_m(results, n, "req_ttfb_p50_ms"), bare_ttfb, "ms", 1, n) for n in names)
        + " |",
        "| time to first byte p50, idle, over direct | " + " | ".join(added(n) for n in names) + " |",
        "",
    ]


def _targets(plan: Plan, results: dict[str, TargetResults], baseline: dict[str, Any]) -> list[str]:
    figures: dict[str, dict[str, float]] = baseline.get("figures", {})

    def over_bare(key: str) -> Callable[[str], float | None]:
        return lambda target: _over(_m(results, target, key), _m(results, BARE, key))

    def idle_added(target: str) -> float | None:
        idle, direct = _m(results, target, "idle_ttfb_p50_ms"), _m(results, "direct", "idle_ttfb_p50_ms")
        return idle - direct if idle is not None and direct is not None else None

    def against_before(key: str) -> Callable[[str], float | None]:
        """Now ÷ before, each as a multiple of the bare relay of its own run."""

        def measure(target: str) -> float | None:
            before = _over(figures.get(target, {}).get(key), figures.get(BARE, {}).get(key))
            return _over(over_bare(key)(target), before)

        return measure

    def before_text(key: str, unit: str) -> Callable[[str, float], str]:
        def shown(target: str, value: float) -> str:
            now, was = _m(results, target, key), figures.get(target, {}).get(key)
            now_bare = over_bare(key)(target) or 0.0
            was_bare = _over(was, figures.get(BARE, {}).get(key)) or 0.0
            absolute = f"; {number(now or 0.0, 1)} {unit} now, {number(was or 0.0, 1)} before" if was else ""
            return f"{value:.3f}× ({now_bare:.2f}× bare now, {was_bare:.2f}× before{absolute})"

        return shown

    def cpu_text(key: str) -> Callable[[str, float], str]:
        return lambda target, value: f"{value:.2f}× ({number(_m(results, target, key) or 0.0, 0)} µs)"

    def bare(key: str, unit: str, digits: int) -> str:
        now, was = _m(results, BARE, key), figures.get(BARE, {}).get(key)
        text = "–" if now is None else f"{number(now, digits)} {unit}"
        return f"{text} ({number(was, digits)} before)" if was is not None and key.startswith("held") else text

    low, c = plan.low_concurrency, plan.concurrency
    both = {BFF: 2.0, REDIS: 2.3}
    rows = [
        Judged(f"CPU per relayed request ≤ 2.0× the bare aiohttp relay (Redis ≤ 2.3×), concurrency {low}",
               over_bare("low_cpu_us"), both, "×", cpu_text("low_cpu_us"), bare("low_cpu_us", "µs", 0)),
        Judged(f"CPU per relayed request ≤ 2.0× the bare aiohttp relay (Redis ≤ 2.3×), concurrency {c}",
               over_bare("req_cpu_us"), both, "×", cpu_text("req_cpu_us"), bare("req_cpu_us", "µs", 0)),
        Judged("Redis round trips per relay admission: 1", lambda t: _m(results, t, "redis_admission_trips"),
               {REDIS: 1.0}, "", lambda t, v: f"{v:g} ({_m(results, t, 'redis_admission_commands') or 0:g} commands)"),
        Judged(f"time to first byte p50 ≤ 1.5× the bare aiohttp relay's, concurrency {c}",
               over_bare("req_ttfb_p50_ms"), {BFF: 1.5}, "×", reference=bare("req_ttfb_p50_ms", "ms", 1)),
        Judged("time to first byte p50 ≤ +1.5 ms over direct, idle", idle_added, {BFF: 1.5}, " ms",
               lambda _, v: f"+{v:.2f} ms", f"+{idle_added(BARE) or 0:.2f} ms"),
        Judged("CPU per relayed chunk at model pace (steady) ≤ 5% worse than before the issue",
               against_before("held_cpu_chunk_us"), {BFF: WORSE_BY, REDIS: WORSE_BY}, "×",
               before_text("held_cpu_chunk_us", "µs"), bare("held_cpu_chunk_us", "µs", 1)),
        Judged("memory per open stream ≤ 5% worse than before the issue",
               against_before("held_kb_per_stream"), {BFF: WORSE_BY, REDIS: WORSE_BY}, "×",
               before_text("held_kb_per_stream", "KB"), bare("held_kb_per_stream", "KB", 1)),
    ]  # fmt: skip
    out = [
        "**Issue 20's targets**, workflow-bff (memory storage) and workflow-bff with Redis each judged against "
        "its own limit where the issue sets one (– : reported, not judged). The last two compare with the "
        f"last `make bench` before the issue ({baseline.get('figures_source', 'bench/baseline-issue20.json')}) "
        "as multiples of the bare aiohttp relay of each run: the bare relay is the same code on the same "
        "libraries in both, so it carries the machine's speed on the day, which absolute µs and KB do not; "
        "the absolute figures are shown beside. Not measured here: per-chunk CPU with tracing on "
        "(`--targets bff-traced`).",
        "",
        f"| target | {TITLES[BFF]} | met | {TITLES[REDIS]} | met | {TITLES[BARE]} |",
        "|---|---:|:---:|---:|:---:|---:|",
    ]
    for row in rows:
        bff_text, bff_met = row.cell(BFF)
        redis_text, redis_met = row.cell(REDIS)
        out.append(f"| {row.label} | {bff_text} | {bff_met} | {redis_text} | {redis_met} | {row.reference} |")
    out.append("")
    commands = results[REDIS].redis_commands if REDIS in results else {}
    if commands:
        out += [
            "One idle relay's commands to redis-server, as MONITOR saw them, split where the upstream received "
            "the relay's first request (commands a script ran in brackets after it; a round trip is one request "
            "the proxy waited on, so a pipeline or a MULTI … EXEC is one):",
            "",
            f"- admission: {_commands(commands.get('admission', []))}",
            f"- the relay and its end: {_commands(commands.get('relay', []))}",
            f"- round trips: {_m(results, REDIS, 'redis_admission_trips') or 0:g} for the admission, "
            f"{_m(results, REDIS, 'redis_relay_trips') or 0:g} for the relay and its end (medians over "
            f"{plan.trip_relays} relays)",
            "",
        ]
    return out


def _commands(names: list[str]) -> str:
    """`EVALSHA (time, zadd x2), GET`: a script's commands (lower case) after its EVAL, repeats counted."""
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        if name.islower() and groups:
            groups[-1][1].append(name)
        else:
            groups.append((name, []))

    def counted(items: list[str]) -> str:
        runs: list[list[Any]] = []
        for item in items:
            if runs and runs[-1][0] == item:
                runs[-1][1] += 1
            else:
                runs.append([item, 1])
        return ", ".join(item if n == 1 else f"{item} ×{n}" for item, n in runs)

    parts = [f"{name} ({counted(inner)})" if inner else name for name, inner in groups]
    return ", ".join(parts) or "none"


def _after(results: dict[str, TargetResults], target: str) -> tuple[dict[str, float], int]:
    """µs per relayed request by part, from this run's profiles (samples over every repeat) and the
    median CPU per request of its measured phase; and the samples they come from."""
    result = results.get(target)
    cpu = _m(results, target, "req_cpu_us")
    if result is None or cpu is None or not result.profile:
        return {}, 0
    pooled: Counter[str] = Counter()
    for samples in result.profile:
        pooled.update(samples)
    return per_request(dict(pooled), cpu), sum(pooled.values())


def _before(baseline: dict[str, Any], target: str) -> tuple[dict[str, float], int]:
    found = baseline.get("profile", {}).get("targets", {}).get(target, {})
    samples = found.get("samples", {})
    return per_request(samples, float(found.get("cpu_us", 0.0))), sum(samples.values())


def _profile(plan: Plan, results: dict[str, TargetResults], baseline: dict[str, Any]) -> list[str]:
    profiled = [name for name in (BFF, REDIS) if name in results and results[name].repeats]
    columns = {name: (_before(baseline, name), _after(results, name)) for name in profiled}
    before = baseline.get("profile", {})
    out = [
        "## Where each microsecond of a relay goes",
        "",
        f"After its measured phases, each repeat relays {plan.profile_requests} more one-chunk streams at "
        f"concurrency {plan.concurrency} with py-spy sampling the proxy {plan.profile_rate} times a second "
        "(bench/profile.py), so the profiler never touches a measured number. Every sample is sorted into the "
        "part of a relay its stack is in (the deepest frame some part claims: a Redis call made by the session "
        "check is the session's; bench/profile.py has the table), and a part's µs are its share of the samples "
        "× the CPU per relayed request the measured phase took. Before: the tree before the issue "
        f"({before.get('commit', '?')}), profiled the same way on {before.get('date', '?')} with its own CPU "
        "per request measured beside (bench/baseline.py).",
        "",
    ]
    missing = [
        f"{TITLES[name]}: {results[name].profile_skipped or 'no profile'}"
        for name in profiled
        if not columns[name][1][1]
    ]
    if missing:
        out += [f"> No profile of this run for {'; '.join(missing)}. The rest of this page is unaffected.", ""]
    header = " | ".join(f"{TITLES[name]} before | {TITLES[name]} now" for name in profiled)
    out += [f"| part of the relay (µs per relayed request) | {header} |", "|---|" + "---:|---:|" * len(profiled)]

    def value(parts: dict[str, float], part: str) -> str:
        return "–" if not parts else number(parts.get(part, 0.0), 0)

    for part, title in CATEGORIES.items():
        if all(not parts.get(part) for pair in columns.values() for parts, _ in pair):
            continue
        cells = [value(parts, part) for pair in columns.values() for parts, _ in pair]
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    totals = [number(sum(parts.values()), 0) if parts else "–" for pair in columns.values() for parts, _ in pair]
    samples = [f"{n:,}" if n else "–" for pair in columns.values() for _, n in pair]
    out += [
        f"| **CPU per relayed request, concurrency {plan.concurrency}** | " + " | ".join(totals) + " |",
        "| samples | " + " | ".join(samples) + " |",
        "",
    ]
    return out
