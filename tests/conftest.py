"""Shared fixtures: one emulated upstream and one proxy per test session, both real processes.

Tests that need other settings start their own proxy with `start_proxy(emulator.url, BFF_X=...)`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import EmulatorControl, RedisServer, ServerProcess, browser, guest_of, start_emulator, start_proxy

IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """The path of an external tool; skips where it is missing, except under CI=true."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def start_redis(data_dir: Path) -> RedisServer:
    """A real `redis-server` on a free port, keeping its data (AOF) in `data_dir`."""
    return RedisServer(require_tool("redis-server"), data_dir).start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def emulator() -> Iterator[ServerProcess]:
    server = start_emulator()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(emulator: ServerProcess) -> Iterator[ServerProcess]:
    server = start_proxy(emulator.url)
    yield server
    server.stop()


@pytest.fixture
def upstream(emulator: ServerProcess) -> Iterator[EmulatorControl]:
    """The emulator's control API, reset before each test so faults never leak between tests."""
    control = EmulatorControl(emulator.url)
    control.reset()
    yield control
    control.reset()


@pytest.fixture
def anonymous(proxy: ServerProcess) -> Iterator[httpx.Client]:
    with browser(proxy.url) as client:
        yield client


@pytest.fixture
def guest(proxy: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    """A browser signed in as a fresh guest."""
    with guest_of(proxy.url) as client:
        yield client
