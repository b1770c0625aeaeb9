"""Where issue 20 (per-request cost) started from: bench/baseline-issue20.json, and how to remake its profile.

The file holds two things:

- `figures`: the medians of the last `make bench` before the issue (docs/PERFORMANCE.md at commit
  1aabe0e), copied from that page, for the targets that compare against them ("per-chunk CPU and
  memory per stream no more than 5% worse"). The bare aiohttp relay's figures of the same run are
  there too, so a comparison can be made as ratios to the bare relay of each run.
- `profile`: the profile of one relay on the tree before the issue, measured like `make bench`'s
  profile phase: per target, CPU per relayed request at concurrency 200 (no profiler attached) and
  py-spy's samples by part of a relay during as many relays again.

    python -m bench.baseline --old ../wt-old    # a checkout of 1aabe0e; rewrites `profile` only

The bare relay is this checkout's (it is the same file in both); workflow-bff comes from `--old`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import phases, servers
from bench.run import Plan, Running, available, profile_relays
from bench.servers import DEFAULT_TARGETS

PATH = Path(__file__).with_name("baseline-issue20.json")
TARGETS = ("bare-aiohttp", "bff", "bff-redis")


def load(path: Path = PATH) -> dict[str, Any]:
    """The baseline, or {} when the file is missing or unreadable."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


async def measure(name: str, workdir: Path, plan: Plan) -> tuple[float, dict[str, int]]:
    """CPU per relayed request at `plan.concurrency`, then py-spy's samples by part over as many again."""
    with Running(name, workdir, plan) as target:
        load = await phases.requests(target, plan.requests, plan.concurrency, plan.request_timeout, "")
        samples = await profile_relays(target, plan, workdir / "profile.txt") if name != "bare-aiohttp" else {}
        if target.failures:
            raise RuntimeError(f"{name}: {target.failures[0].detail}")
        return float(load["_cpu_us"] or 0.0), samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the tree before the issue")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=Plan.requests, help="requests per phase")
    parser.add_argument("--out", type=Path, default=PATH)
    args = parser.parse_args(argv)
    for name in TARGETS:
        if (why := available(name)) is not None:
            print(f"{name}: {why}", file=sys.stderr)
            return 2
    plan = replace(Plan(quick=False, repeats=args.repeats, targets=DEFAULT_TARGETS), requests=args.requests)
    plan = replace(plan, profile_requests=args.requests)
    new_root, old_root = servers.ROOT, args.old.resolve()
    cpu: dict[str, list[float]] = {}
    samples: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        for repeat in range(args.repeats):
            for name in TARGETS:
                servers.ROOT = new_root if name == "bare-aiohttp" else old_root
                workdir = Path(tmp) / f"{repeat}-{name}"
                workdir.mkdir()
                cpu_us, found = asyncio.run(measure(name, workdir, plan))
                cpu.setdefault(name, []).append(cpu_us)
                samples.setdefault(name, Counter()).update(found)
                print(f"repeat {repeat + 1} {name:13} CPU/request {cpu_us:7.0f} µs, {sum(found.values())} samples")
    servers.ROOT = new_root
    commit = subprocess.run(
        ["git", "-C", str(old_root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    baseline = load(args.out)
    baseline["profile"] = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "requests": plan.requests,
        "concurrency": plan.concurrency,
        "repeats": args.repeats,
        "targets": {
            name: {"cpu_us": statistics.median(cpu[name]), "samples": dict(samples[name].most_common())}
            for name in TARGETS
        },
    }
    args.out.write_text(json.dumps(baseline, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
