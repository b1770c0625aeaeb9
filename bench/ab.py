"""`python -m bench.ab --old DIR`: per-request cost of two workflow-bff trees, in alternating runs.

Each round starts every target afresh (its own upstream, and redis-server for bff-redis), once with
the proxy from `--old` (a checkout, e.g. `git worktree add --detach ../old HEAD~1`) and once from this
one, in alternating order, and measures the `requests` phase of `make bench` at concurrency 10 and
200 (CPU per relayed request, time to first byte p50), and with `--idle N` the idle time to first
byte. It prints each run and the medians, so a commit message can say what a change bought, measured
side by side. Both trees run on this interpreter and its packages (a dependency change is measured
by installing it into a tree of its own: `pip install --target DIR`). Needs what `make bench` needs:
Node for the bench's upstream, redis-server for bff-redis, py-spy for `--profile`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from bench import phases, servers
from bench.profile import Profiler
from bench.run import Plan, Running, available

COLUMNS = (("c10_cpu_us", "CPU/req c10 µs"), ("cpu_us", "CPU/req c200 µs"), ("ttfb_p50_ms", "TTFB p50 c200 ms"))
IDLE = ("idle_ttfb_p50_ms", "idle TTFB p50 ms")


async def measure(name: str, workdir: Path, requests: int, idle: int, profile: Path | None) -> dict[str, float]:
    with Running(name, workdir, Plan(quick=False, repeats=1, targets=())) as target:
        assert target.proxy is not None
        out: dict[str, float] = {}
        if idle:
            metrics, _ = await phases.idle_ttfb(target, idle, 20, 60.0)
            out[IDLE[0]] = float(metrics.get("idle_ttfb_p50_ms") or 0.0)
        low_profile = profile.with_name(profile.name.replace("profile-", "profile-c10-")) if profile else None
        with Profiler(target.proxy.process.pid, low_profile) if low_profile else contextlib.nullcontext():
            low = await phases.requests(target, requests // 2, 10, 60.0, "c10")
        with Profiler(target.proxy.process.pid, profile) if profile else contextlib.nullcontext():
            load = await phases.requests(target, requests, 200, 60.0, "")
        if target.failures:
            log = target.proxy.log.read_text(errors="replace").splitlines()
            notable = [line for line in log if '"audit"' not in line and '"status": 200' not in line][-12:]
            raise RuntimeError("\n".join([f"{name}: {target.failures[0].detail}", *notable]))
        out["c10_cpu_us"] = float(low["c10_cpu_us"] or 0.0)
        out["cpu_us"] = float(load["_cpu_us"] or 0.0)
        out["ttfb_p50_ms"] = float(load["_ttfb_p50_ms"] or 0.0)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the checkout to compare this one with")
    parser.add_argument("--targets", default="bff", help="comma list: bff, bff-redis, bare-aiohttp")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree (default 3)")
    parser.add_argument("--requests", type=int, default=3000, help="requests at concurrency 200 per run (default 3000)")
    parser.add_argument("--profile", type=Path, help="py-spy each run (at concurrency 10 and 200) into this directory")
    parser.add_argument(
        "--idle", type=int, default=0, help="also idle time to first byte, over this many requests (default 0: not)"
    )
    args = parser.parse_args(argv)
    new_root = servers.ROOT
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    columns = COLUMNS + ((IDLE,) if args.idle else ())
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        for round_ in range(args.rounds):
            order = [("old", args.old.resolve()), ("new", new_root)]
            if round_ % 2:
                order.reverse()
            for name in args.targets.split(","):
                if (why := available(name)) is not None:
                    print(f"{name}: {why}", file=sys.stderr)
                    return 2
                trees = order if name.startswith("bff") else [("-", new_root)]
                for label, root in trees:
                    servers.ROOT = root
                    workdir = Path(tmp) / f"{round_}-{name}-{label}"
                    workdir.mkdir()
                    profile = args.profile / f"profile-{name}-{label}-{round_ + 1}.txt" if args.profile else None
                    row = asyncio.run(measure(name, workdir, args.requests, args.idle, profile))
                    results.setdefault((name, label), []).append(row)
                    cells = "  ".join(f"{title} {row[key]:8.1f}" for key, title in columns)
                    print(f"round {round_ + 1} {name:13} {label:3}  {cells}", flush=True)
    print("\nmedians:")
    for (name, label), rows in results.items():
        cells = "  ".join(f"{title} {statistics.median(r[key] for r in rows):8.1f}" for key, title in columns)
        print(f"  {name:13} {label:3}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
