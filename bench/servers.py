"""The processes under test, started for real, and what `/proc` says about them.

Targets (each a black box on a loopback port):
  direct        the client talks to the bench upstream itself (no proxy: the floor)
  nginx         nginx `proxy_pass` with buffering off, config generated here (the reference proxy)
  bare-aiohttp  a bare Starlette relay with an aiohttp client (bench/bare_relay.py)
  bare-httpx    the same bare relay with an httpx client
  bff           workflow-bff: `python -m proxy serve`, full middleware stack, guest sessions, CSRF
  bff-redis     the same with BFF_STORAGE_URL at a throwaway redis-server: sessions, limits and every
                run's chunk log (mirrored to Redis Streams) there
  bff-traced    workflow-bff with OpenTelemetry tracing on, every span exported over OTLP/HTTP to a
                sink (bench/otlp_sink.py) that keeps nothing
CPU time comes from /proc/<pid>/task/*/schedstat (nanoseconds on CPU, every thread of every process
in the tree), memory from VmRSS in /proc/<pid>/status.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
BENCH_API_KEY = "sk_bench_" + secrets.token_hex(16)
WORKFLOW_ALIAS = "bench"
WORKFLOW_ID = "wf_bench"
TARGETS = ("direct", "nginx", "bare-aiohttp", "bare-httpx", "bff", "bff-redis", "bff-pool", "bff-traced")
# bare-httpx is left out unless asked for: it shows what the httpx client costs, and takes as long as
# direct, nginx, bare-aiohttp and bff together. bff-pool is workflow-bff with pre-minted tokens
# (BFF_TOKEN_POOL), to be compared with bff and direct under an emulated upstream round trip (--rtt-ms 50).
BFF_POOL_SIZE = "16"
DEFAULT_TARGETS = ("direct", "nginx", "bare-aiohttp", "bff", "bff-redis")
# Limits far above what the bench sends: the limiter still runs on every request (its cost is
# measured), it just never refuses. No resume grace: a run nobody follows any more stops at once, so
# the streams a phase abandons (the held phase's clients leave) do not go on generating into the next.
BFF_BENCH_ENV = {
    "BFF_MAX_CONNECTIONS": "100000",  # the capacity phase opens thousands of streams at once
    "BFF_RATE_LIMITS": "mint=10000000/minute;relay=10000000/minute;login=10000000/minute",
    "BFF_MAX_CONCURRENT_STREAMS": "10000",  # the highest it accepts; 200 guest sessions share the streams
    "BFF_RESUME_GRACE_SECONDS": "0",
}
REDIS_MISSING = "redis-server is not installed (apt-get install -y redis-server)"


# --- /proc ---------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU, summed over every thread of `pids` (schedstat: ns precision)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                    total += int(schedstat.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def cpu_ticks_ns(pids: list[int]) -> int:
    """utime+stime from /proc/<pid>/stat (10 ms ticks, includes exited threads), as ns: a cross-check."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total * 1_000_000_000 // tick


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def _machine_ticks() -> list[int]:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (fields + [0] * 8)[:8]


def machine_busy_ns() -> int:
    """CPU time the whole machine spent busy (all cores, every process and the kernel), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _machine_ticks()
    return (user + nice + system + irq + softirq + steal) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def machine_steal_ns() -> int:
    """Time a virtual machine's cores wanted to run but the hypervisor ran someone else: on a shared
    host, the main reason the same work measures slower from one run to the next."""
    return _machine_ticks()[7] * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Server:
    """A child process listening on 127.0.0.1:`port`, its output in `log`."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    pids: list[int] = field(default_factory=list)

    def refresh_pids(self) -> list[int]:
        self.pids = descendants(self.process.pid)
        return self.pids

    def cpu_ns(self) -> int:
        return cpu_ns(self.pids)

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, command: list[str], workdir: Path, env: dict[str, str] | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Server(name, process, 0, log)


def _wait_for_port(server: Server, find_port: object) -> Server:
    """Poll the log until `find_port(line)` returns the port the server announced."""
    assert callable(find_port)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        for line in server.log.read_text(errors="replace").splitlines():
            port = find_port(line)
            if port:
                server.port = int(port)
                server.refresh_pids()
                return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


def _json_line(line: str) -> dict[str, object]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def start_upstream(workdir: Path, rtt_ms: float = 0.0) -> Server:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is required for the bench upstream")
    command = [node, str(ROOT / "bench" / "upstream.mjs"), "--api-key", BENCH_API_KEY, "--port", "0"]
    if rtt_ms:
        command += ["--rtt-ms", str(rtt_ms)]
    server = _spawn("upstream", command, workdir)
    return _wait_for_port(server, lambda line: _json_line(line).get("listening"))


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )


NGINX_CONF = """\
# Generated by bench/servers.py: the reference relay, nginx at its usual streaming settings.
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-temp/client_body;
    proxy_temp_path {dir}/nginx-temp/proxy;
    fastcgi_temp_path {dir}/nginx-temp/fastcgi;
    uwsgi_temp_path {dir}/nginx-temp/uwsgi;
    scgi_temp_path {dir}/nginx-temp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, upstream_port: int) -> Server:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
    nofile = _nofile_limit()
    port = free_port()
    conf = workdir / "nginx.conf"
    # Its temp dirs go in a folder of their own: one named `proxy` in the working directory would
    # shadow the package for `python -m proxy` started there.
    (workdir / "nginx-temp").mkdir(parents=True, exist_ok=True)
    conf.write_text(
        NGINX_CONF.format(
            dir=workdir,
            nofile=nofile,
            connections=max(nofile // 2, 1024),
            upstream_port=upstream_port,
            port=port,
        )
    )
    server = _spawn(
        "nginx", [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")], workdir
    )
    server.port = port
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and server.alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        # The worker forks after the listener is open; wait until it exists.
        while len(server.refresh_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        return server
    server.stop()
    error_log = workdir / "nginx-error.log"
    detail = error_log.read_text(errors="replace") if error_log.exists() else server.log_tail()
    raise RuntimeError(f"nginx did not start:\n{detail}")


def start_bare(workdir: Path, upstream_port: int, client: str) -> Server:
    command = [
        sys.executable, "-m", "bench.bare_relay", "--client", client,
        "--upstream", f"http://127.0.0.1:{upstream_port}", "--port", "0",
    ]  # fmt: skip
    server = _spawn(f"bare-{client}", command, workdir, {"PYTHONPATH": str(ROOT)})
    return _wait_for_port(server, lambda line: _json_line(line).get("listening"))


def start_redis(workdir: Path) -> Server:
    """A throwaway redis-server (no persistence, loopback only) for bff-redis and the workers phase."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(REDIS_MISSING)
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    server = _spawn("redis", command, workdir)
    return _wait_for_port(server, lambda line: port if "Ready to accept connections" in line else None)


def start_otlp_sink(workdir: Path) -> Server:
    """Where bff-traced exports its spans: an OTLP/HTTP endpoint that keeps nothing."""
    command = [sys.executable, "-m", "bench.otlp_sink", "--port", "0"]
    server = _spawn("otlp-sink", command, workdir, {"PYTHONPATH": str(ROOT)})
    return _wait_for_port(server, lambda line: _json_line(line).get("listening"))


def tracing_env(sink: Server) -> dict[str, str]:
    """workflow-bff's environment for tracing every request to `sink` (the SDK's default batching)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}"}


def storage_env(redis: Server) -> dict[str, str]:
    """workflow-bff's environment for keeping its sessions, limits and run logs in `redis`."""
    return {"BFF_STORAGE_URL": f"redis://127.0.0.1:{redis.port}/0"}


def start_bff(
    workdir: Path,
    upstream_port: int,
    extra_env: dict[str, str] | None = None,
    name: str = "bff",
    workers: int = 1,
) -> Server:
    env = {
        "BFF_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}",
        "BFF_API_KEY": BENCH_API_KEY,
        "BFF_SESSION_SECRETS": secrets.token_urlsafe(48),
        "BFF_WORKFLOWS": f"{WORKFLOW_ALIAS}={WORKFLOW_ID}",
        "BFF_AUTH": "guest",
        "BFF_COOKIE_SECURE": "false",
        **BFF_BENCH_ENV,
        **(extra_env or {}),
    }
    # The working directory is the run's temp dir, so a developer's .env is not picked up; the proxy
    # measured is this checkout's, not whichever one the venv's editable install points at.
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0"]
    if workers > 1:
        command += ["--workers", str(workers)]
    server = _spawn(name, command, workdir, env)

    def announced(line: str) -> int | None:
        entry = _json_line(line)
        if entry.get("message") == "listening":
            return int(str(entry["url"]).rsplit(":", 1)[1])
        return None

    server = _wait_for_port(server, announced)
    deadline = time.monotonic() + START_TIMEOUT
    while _listening_lines(server) < workers:  # every worker, so its CPU is counted from the start
        if time.monotonic() > deadline or not server.alive():
            server.stop()
            raise RuntimeError(f"{name}: not every worker started:\n{server.log_tail()}")
        time.sleep(0.05)
    server.refresh_pids()
    return server


def _listening_lines(server: Server) -> int:
    lines = server.log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if _json_line(line).get("message") == "listening")


def _nofile_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard if hard != resource.RLIM_INFINITY else max(soft, 65536)


def raise_nofile_limit() -> int:
    """Thousands of open streams need thousands of sockets; children inherit the raised limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
