"""py-spy on a Python proxy while a phase runs, and what its samples say: hot spots, and where each
microsecond of a relay goes.

py-spy attaches to the running process from outside (no code change, no restart), so the profile
is of exactly what the bench measures. A profile is collapsed stacks (`profile-<target>-<phase>.txt`:
flamegraph.pl, speedscope.app and inferno read them). `summarize` names the functions with the most
samples, by own time and by inclusive time; `categorise` sorts every sample into the parts of a relay
the issue on per-request cost names (HTTP parsing, routing, middleware, session, admission, mint,
upstream request, logging, metrics), and `per_request` turns those shares into µs per relayed request.

A sample belongs to the deepest frame of its stack that some part claims (a JSON encoder called by the
log formatter is logging; a Redis call made by the session check is the session). Library and storage
frames that serve whoever calls them claim nothing themselves; only a stack with no claimed frame at
all falls back to what its frames are (the event loop, the upstream client's protocol callbacks, a flusher task).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import TracebackType

SAMPLES_PER_SECOND = 250
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
STDLIB = re.compile(r"lib/python3\.\d+/")

# The parts of a relay, in the order a request meets them, with their titles in the report.
CATEGORIES = {
    "http": "HTTP parsing and writing (uvicorn, httptools, Starlette's request, the body)",
    "routing": "routing (Starlette's router, the route handler)",
    "middleware": "middleware (request id, security headers, CORS, CSRF, body policy, tracing)",
    "session": "session (cookie signature, session record)",
    "admission": "admission (budget, stream slot, rate limit, the run's log opened)",
    "mint": "mint (the token request upstream)",
    "upstream": "upstream request (the HTTP client, proxy/upstream/http1.py; the stream request)",
    "relay": "relay (the run, its chunk log, the response)",
    "logging": "logging (access log, audit, JSON lines)",
    "metrics": "metrics (Prometheus)",
    "storage": "storage where the caller is out of sight (a Redis call in a task of its own, the log flusher)",
    "loop": "event loop (asyncio, uvloop)",
    "other": "other",
}
# Module (or function) prefixes, as `short` writes frames, and the part each claims. The longest
# prefix that matches a frame decides, so `proxy.middleware.access_log` is logging, not middleware.
CLAIMS = {
    "uvicorn": "http",
    "httptools": "http",
    "h11": "http",
    "proxy.server_protocol": "http",
    "starlette.requests": "http",
    "starlette.datastructures": "http",
    "starlette.formparsers": "http",
    "proxy.body": "http",
    "proxy.models": "http",
    "pydantic": "http",
    "pydantic_core": "http",
    "starlette.routing": "routing",
    "starlette.applications": "routing",
    "starlette._exception_handler": "routing",
    "proxy.routes": "routing",
    "proxy.workflows": "routing",
    "proxy.chat": "routing",
    "proxy.errors": "routing",
    "starlette.middleware": "middleware",
    "proxy.middleware": "middleware",
    "proxy.tracing": "middleware",
    "proxy.drain": "middleware",
    "proxy.sessions": "session",
    "proxy.auth": "session",
    "proxy.sealing": "session",
    "itsdangerous": "session",
    "proxy.runs.manager.RunManager.start": "admission",
    "proxy.runs.manager.RunManager._admit": "admission",
    "proxy.budget": "admission",
    "proxy.slots": "admission",
    "proxy.rate_limiter": "admission",
    "proxy.limits": "admission",
    "limits": "admission",
    "proxy.token_pool": "mint",
    "proxy.upstream.client.HttpUpstream.mint_token": "mint",
    "proxy.upstream.client.HttpUpstream._minted": "mint",
    "proxy.upstream": "upstream",
    "proxy.runs": "relay",
    "proxy.protocols": "relay",
    "proxy.streams": "relay",
    "starlette.responses": "relay",
    "logging": "logging",
    "proxy.logging": "logging",
    "proxy.audit": "logging",
    "proxy.middleware.access_log": "logging",
    "prometheus_client": "metrics",
    "proxy.metrics": "metrics",
}
# What a stack with no claimed frame is: its deepest frame of ours, or else its deepest library frame.
OWN_FALLBACKS = {
    "proxy.storage.runlog": "relay",
    "proxy.storage.runlog_redis": "relay",
    "proxy.storage": "storage",
}
FALLBACKS = {
    "aiohttp": "upstream",
    "yarl": "upstream",
    "multidict": "upstream",
    "redis": "storage",
    "asyncio": "loop",
    "uvloop": "loop",
    "anyio": "loop",
    "selectors": "loop",
}
# The frames every stack starts with (`<frozen runpy>`, the CLI, uvicorn's server, the event loop running a
# callback): they say nothing about what the callback is doing, and uvicorn's would claim it for HTTP.
ENTRY = ("proxy.__main__", "proxy.cli", "uvicorn.main", "uvicorn.server", "uvicorn._compat",
         "asyncio.runners", "asyncio.base_events", "asyncio.events")  # fmt: skip
# The door to the upstream serves both upstream requests: under a mint frame, it is the mint's.
MINT_FRAMES = tuple(prefix for prefix, part in CLAIMS.items() if part == "mint")


def py_spy() -> str | None:
    """The py-spy binary (on PATH, or beside this Python's), or None."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


class Profiler:
    """py-spy recording `pid` into `path` for the duration of a `with` block (a no-op without py-spy)."""

    def __init__(self, pid: int, path: Path, rate: int = SAMPLES_PER_SECOND) -> None:
        self.pid, self.path, self.rate = pid, path, rate
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        binary = py_spy()
        if binary is None:
            return self
        self.process = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(self.path), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def short(frame: str) -> str:
    """`function (path/to/module.py:12)` as `module.function`: site-packages and the standard library
    trimmed, and the project's files named from their package, whichever checkout they are in."""
    found = FRAME.match(frame)
    if not found:
        return frame
    path = found["file"]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif stdlib := STDLIB.search(path):
        path = path[stdlib.end() :]
    else:
        for package in ("/proxy/", "/bench/"):
            if package in path:
                path = package[1:] + path.rsplit(package, 1)[1]
                break
    return f"{path.removesuffix('.py').removesuffix('/__init__').replace('/', '.')}.{found['function']}"


def stacks(path: Path) -> list[tuple[list[str], int]]:
    """The collapsed stacks of a py-spy profile, root first, as `short` frames with their sample counts."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            found.append(([short(frame) for frame in stack.split(";")], int(count)))
    return found


def _starts(frame: str, prefix: str) -> bool:
    return frame == prefix or frame.startswith(prefix + ".")


def _match(frame: str, table: dict[str, str]) -> str | None:
    """The part of the longest prefix in `table` that `frame` starts with (at a dot), or None."""
    best = max((prefix for prefix in table if _starts(frame, prefix)), key=len, default=None)
    return None if best is None else table[best]


def category(frames: list[str]) -> str:
    """The part of a relay one sample's stack (root first) belongs to: see the module's docstring."""
    entry = 0
    while entry < len(frames) and (frames[entry].startswith("<") or any(_starts(frames[entry], p) for p in ENTRY)):
        entry += 1
    frames = frames[entry:]
    if not frames:
        return "loop"
    for depth in range(len(frames) - 1, -1, -1):
        part = _match(frames[depth], CLAIMS)
        if part == "upstream" and any(_starts(frame, mint) for frame in frames[:depth] for mint in MINT_FRAMES):
            return "mint"
        if part is not None:
            return part
    for table in (OWN_FALLBACKS, FALLBACKS):
        for frame in reversed(frames):
            if (part := _match(frame, table)) is not None:
                return part
    return "other"


def categorise(path: Path) -> dict[str, int]:
    """Samples by part of a relay (keys of CATEGORIES); empty if there is no profile at `path`."""
    try:
        found = stacks(path)
    except OSError:
        return {}
    counts: Counter[str] = Counter()
    for frames, samples in found:
        counts[category(frames)] += samples
    return dict(counts)


def per_request(samples: dict[str, int], cpu_us: float) -> dict[str, float]:
    """Each part's share of the samples times the CPU a relayed request measured: µs per request."""
    total = sum(samples.values())
    return {part: cpu_us * n / total for part, n in samples.items()} if total else {}


def summarize(path: Path, top: int = 20) -> str:
    """The functions with the most samples: own (self) time and inclusive time, in % of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        found = stacks(path)
    except OSError:
        return f"{path.name}: no profile (is py-spy installed? pip install -e '.[bench]')"
    for frames, samples in found:
        total += samples
        own[frames[-1]] += samples
        for function in set(frames):
            inclusive[function] += samples
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples"]
    out += ["  own time:"] + [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["  inclusive time:"]
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(out)
