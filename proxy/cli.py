"""workflow-bff's command line: serve | demo | check | emulator | secret | users | sessions | usage."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import math
import os
import secrets
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from pydantic import ValidationError
from starlette.routing import Mount
from starlette.types import ASGIApp

from proxy import __version__
from proxy.app import create_app
from proxy.auth import AuthConfigError, build_authenticators, build_oidc
from proxy.auth.users_cli import add_users_command
from proxy.drain import Drain
from proxy.emulator import create_emulator
from proxy.errors import ApiError
from proxy.logging import configure_logging
from proxy.routes.demo import demo_routes
from proxy.server_protocol import guarded_protocol
from proxy.sessions_cli import add_sessions_command
from proxy.settings import Settings, describe_errors, invalid_fields
from proxy.storage import REDIS_SCHEMES, StorageUnavailable, open_limits_storage, open_storage, storage_scheme
from proxy.tracing import exporter_names
from proxy.upstream.client import HttpUpstream
from proxy.usage_cli import add_usage_command
from proxy.workers import run_workers
from proxy.workflows import WorkflowConfigError, parse_workflows

logger = logging.getLogger("proxy")
# Longer than the usual load-balancer idle timeout (60 s), or the balancer sees spurious 502s.
KEEP_ALIVE_SECONDS = 75
GRACEFUL_SHUTDOWN_SECONDS = 30
DRAIN_MARGIN_SECONDS = 5


class ConfigError(Exception):
    pass


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("\n".join(describe_errors(exc))) from None


def checked_settings() -> Settings:
    """The settings `serve` and `check` run with, or a ConfigError naming every problem at once: the
    invalid values, what is missing, the workflows and the sign-in methods, not one stage at a time."""
    problems: list[str] = []
    try:
        settings = Settings()
    except ValidationError as exc:
        problems += describe_errors(exc)
        # The rest is checked with those settings at their defaults, so its problems are found too.
        invalid = invalid_fields(exc)
        settings = Settings(
            **{name: Settings.model_fields[name].get_default(call_default_factory=True) for name in invalid}
        )
    else:
        invalid = set()
    missing = settings.missing_for_serve()
    problems += [f"{line}: required" for line in missing if not _named(line) & invalid]
    # A stage whose settings are invalid or missing was reported above; checking it too would only
    # say the same twice.
    reported = invalid.union(*map(_named, missing))
    if not reported & {"workflows", "workflows_file"}:
        try:
            parse_workflows(settings.workflows, settings.workflows_file)
        except WorkflowConfigError as exc:
            problems.append(str(exc))
    if not reported & {"auth", "jwt_secret", "jwks_url", "users_file"}:
        try:
            # Reads the users file: a bad one stops start-up, named. (The limits storage connects lazily.)
            build_authenticators(settings, open_limits_storage(settings.storage_url))
            if "oidc" not in reported:
                build_oidc(settings)
        except AuthConfigError as exc:
            problems.append(str(exc))
    try:
        exporter_names(os.environ)  # tracing's OTEL_* variables: an exporter or protocol we lack
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return settings


def _named(requirement: str) -> set[str]:
    """The settings a `missing_for_serve` line names ("BFF_WORKFLOWS or BFF_WORKFLOWS_FILE")."""
    return {field for field in Settings.model_fields if f"BFF_{field.upper()}" in requirement.split()}


class PortInUse(Exception):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"{host}:{port} is already in use; stop what listens there, or pass --port (e.g. --port {port + 1})"
            ) from None
        raise
    # Listening before uvicorn starts means a client that connects as soon as we announce the
    # address waits in the backlog instead of being refused.
    sock.listen(2048)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM or SIGINT also starts the app's drain (proxy/drain.py)."""

    def __init__(self, config: uvicorn.Config, drain: Drain | None) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None:
            self._drain.begin()
        super().handle_exit(sig, frame)


# Net allocations of container objects between collections of the youngest generation (CPython: 700):
# also how much cyclic garbage (an error's traceback, a closed connection) can wait to be collected.
GC_YOUNG_THRESHOLD = 10_000


def run_server(
    app: ASGIApp,
    sockets: list[socket.socket],
    name: str,
    *,
    drain: Drain | None = None,
    settings: Settings | None = None,
) -> None:
    """Serve `app` on `sockets`: the first is the public listener, a second the metrics one. With
    `settings`, with the connection limits a server facing the network needs (proxy/server_protocol.py)."""
    host, port = sockets[0].getsockname()[:2]
    # uvicorn's own limit must leave the drain its full time, plus a margin to end streams cleanly.
    graceful = GRACEFUL_SHUTDOWN_SECONDS
    if drain is not None:
        graceful = max(graceful, math.ceil(drain.seconds + DRAIN_MARGIN_SECONDS))
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # proxy/middleware/access_log.py writes one summary line per request instead
        proxy_headers=False,  # forwarded headers are believed only via BFF_TRUSTED_PROXIES
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=graceful,
    )
    if settings is not None:
        config.http = guarded_protocol(
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
        )
        config.limit_concurrency = settings.max_connections
    extra: dict[str, object] = {"service": name, "url": f"http://{host}:{port}"}
    if len(sockets) > 1:
        metrics_host, metrics_port = sockets[1].getsockname()[:2]
        extra["metrics_url"] = f"http://{metrics_host}:{metrics_port}/metrics"
    logger.info("listening", extra=extra)
    tune_garbage_collector()
    DrainingServer(config, drain).run(sockets=sockets)


def tune_garbage_collector() -> None:
    """Make the cycle collector cheap for a server (it took about a quarter of a relay's CPU).

    A relay leaves no reference cycles (tests/test_garbage.py), so its objects are freed by reference
    counting and the collector finds nothing; what it cost was walking live objects: those of the
    requests in flight, every answer kept for resuming, and everything alive at start-up. Those are
    frozen out of its walks, and the youngest generation is collected after `GC_YOUNG_THRESHOLD` net
    allocations of container objects, some fourteen times less often. Cyclic garbage still made
    elsewhere (an error's traceback, say) is collected with its generation, later than before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def serve(args: argparse.Namespace) -> None:
    settings = checked_settings()
    if args.workers < 1:
        raise ConfigError("--workers: at least 1")
    if args.workers > 1 and storage_scheme(settings.storage_url) not in REDIS_SCHEMES:
        raise ConfigError(
            "BFF_STORAGE_URL: --workers above 1 needs shared storage (redis://...); with memory:// each "
            "worker would have its own sessions and limits"
        )
    configure_logging(settings.secret_values())
    if not settings.allowed_hosts:
        logger.warning(
            "BFF_ALLOWED_HOSTS is empty: any Host header is answered; set it to the names browsers use "
            "(e.g. app.example.com), so a rebound DNS name cannot pass the origin check"
        )
    sockets = [bind(args.host, args.port)]
    if settings.metrics_port:
        sockets.append(bind(args.host, settings.metrics_port))

    def work() -> None:
        app = create_app(settings)
        run_server(app, sockets, "workflow-bff", drain=app.state.drain, settings=settings)

    if args.workers == 1:
        work()
    elif run_workers(args.workers, work) != 0:
        raise SystemExit(1)


def demo(args: argparse.Namespace) -> None:
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    local_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host  # noqa: S104
    api_key = "sk_demo_" + secrets.token_urlsafe(24)
    demo_settings: dict[str, Any] = {
        "upstream_url": f"http://{local_host}:{port}/_emulator",
        "api_key": api_key,
        "session_secrets": secrets.token_urlsafe(48),  # ephemeral: sessions end with the process
        "workflows": "tutor=wf_demo_tutor",
        "auth": "guest",
        "cookie_secure": False,
    }
    settings = load_settings(_env_file=None, **demo_settings)
    if settings.oidc_issuer:
        # The environment names an identity provider: the page also offers "Sign in" with it, and
        # comes back to this demo's own address unless BFF_PUBLIC_URL says another.
        origin = f"http://[{local_host}]:{port}" if ":" in local_host else f"http://{local_host}:{port}"
        demo_settings |= {"auth": "guest,oidc", "public_url": settings.public_url or origin}
        settings = load_settings(_env_file=None, **demo_settings)
    configure_logging(settings.secret_values())
    emulator = Mount("/_emulator", app=create_emulator(api_key, chunk_delay=0.05))
    try:
        app = create_app(settings, extra_routes=[*demo_routes(), emulator])
    except AuthConfigError as exc:  # only oidc can fail here: the demo's own settings are complete
        raise ConfigError(f"{exc} (the demo offers OIDC sign-in because BFF_OIDC_ISSUER is set)") from None
    print(f"workflow-bff demo: open http://{local_host}:{port}/  (Ctrl+C to stop)", file=sys.stderr)
    run_server(app, [sock], "workflow-bff demo", drain=app.state.drain, settings=settings)


def check(args: argparse.Namespace) -> None:
    """Valid settings, reachable storage, and an upstream that mints with the key: each problem said
    with its cause, and all of them in one run."""
    settings = checked_settings()
    configure_logging(settings.secret_values(), level="ERROR")
    problems = asyncio.run(_live_problems(settings))
    if problems:
        raise ConfigError("\n".join(problems))
    print(
        f"ok: configuration valid; storage {storage_scheme(settings.storage_url)}:// reachable; "
        f"{settings.upstream_url} minted a test token with the API key"
    )


async def _live_problems(settings: Settings) -> list[str]:
    api_key = settings.api_key
    assert api_key is not None
    problems = []
    storage = open_storage(settings.storage_url)
    try:
        await storage.ping()
    except StorageUnavailable:
        problems.append(f"BFF_STORAGE_URL: cannot reach the storage: {_cause(settings.storage_url)}")
    finally:
        await storage.close()
    upstream = HttpUpstream(settings.upstream_url, api_key, max_stream_seconds=30.0)
    try:
        await upstream.mint_token(ttl=1)
    except ApiError as exc:
        # The transport's own words (connection refused, name not known), which the API error hides.
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ is not None else ""
        minted = f"{settings.upstream_url} did not mint a test token"
        problems.append(f"BFF_UPSTREAM_URL / BFF_API_KEY: {minted}: {exc.code}: {exc.message}{cause}")
    finally:
        await upstream.aclose()
    return problems


def _cause(storage_url: str) -> str:
    parts = urlsplit(storage_url)
    return f"nothing answers at {parts.hostname}:{parts.port or 6379} (is Redis running, and the URL right?)"


def emulator(args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise ConfigError("BFF_API_KEY: required (the key the emulator accepts, as serve sends it)")
    configure_logging(settings.secret_values())
    app = create_emulator(
        settings.api_key.get_secret_value(),
        chunk_delay=args.chunk_delay,
        max_stream_seconds=args.max_stream_seconds,
        rate_limit_per_minute=args.rate_limit,
    )
    run_server(app, [bind(args.host, args.port)], "emulated upstream")


def secret(args: argparse.Namespace) -> None:
    print(secrets.token_urlsafe(48))


CONFIGURATION = (
    "Configuration comes from BFF_* environment variables, and from a .env file in the working directory "
    "(see .env.example and the README)."
)


def main(argv: list[str] | None = None) -> int:
    # The `workflow-bff` entry point names itself; `python -m proxy` otherwise.
    prog = "workflow-bff" if Path(sys.argv[0]).name == "workflow-bff" else "python -m proxy"
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog=prog, description=f"workflow-bff {__version__}: {__doc__.splitlines()[0]}", epilog=CONFIGURATION
    )
    parser.add_argument("--version", action="version", version=f"workflow-bff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_text in (
        ("serve", serve, "run the service (production)"),
        ("demo", demo, "run with an emulated upstream and a demo page; no API key needed"),
        ("emulator", emulator, "run only the emulated upstream API, for local development"),
    ):
        command = commands.add_parser(
            name, help=help_text, description=help_text, epilog=CONFIGURATION, formatter_class=defaults
        )
        command.add_argument("--host", default="127.0.0.1", help="address to listen on")
        command.add_argument(
            "--port", type=int, default=9000 if name == "emulator" else 8000, help="port to listen on (0: any free one)"
        )
        command.set_defaults(handler=handler)
        if name == "serve":
            command.add_argument(
                "--workers", type=int, default=1, help="processes sharing the port (above 1 needs Redis storage)"
            )
        if name == "emulator":
            command.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between chunks")
            command.add_argument("--max-stream-seconds", type=float, default=300.0, help="the upstream's stream cap")
            command.add_argument("--rate-limit", type=int, default=600, help="keyed requests per minute")
    check_help = "validate the configuration, reach the storage, and mint one (unused) test token"
    commands.add_parser("check", help=check_help, description=check_help, epilog=CONFIGURATION).set_defaults(
        handler=check
    )
    new_key = "print a new random key for BFF_SESSION_SECRETS (or any other secret)"
    commands.add_parser("secret", help=new_key, description=new_key).set_defaults(handler=secret)
    add_users_command(commands)
    add_sessions_command(commands)
    add_usage_command(commands)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except PortInUse as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
