"""Upstream resilience: a dead upstream gets fast answers, and an upstream 429 on minting is honoured.

Each test runs its own proxy: the circuit breaker and the mint pause are per-process state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import EmulatorControl, ServerProcess, proxy_with


@pytest.fixture
def own_proxy(emulator: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    with proxy_with(emulator.url, BFF_UPSTREAM_FAILURE_THRESHOLD="3", BFF_UPSTREAM_COOLDOWN_SECONDS="1") as client:
        yield client


def mint(client: httpx.Client) -> httpx.Response:
    return client.post("/api/token", json={"workflow": "tutor"})


@pytest.mark.parametrize("shape", ["flat", "nested", "text"])
def test_an_upstream_429_pauses_minting_for_its_retry_after(
    own_proxy: httpx.Client, upstream: EmulatorControl, shape: str
) -> None:
    upstream.fault(op="mint", status=429, retry_after=30, shape=shape)

    first, second = mint(own_proxy), mint(own_proxy)

    for response in (first, second):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert first.headers["retry-after"] == "30"
    assert 1 <= int(second.headers["retry-after"]) <= 30
    assert len(upstream.requests("mint")) == 1  # the second mint never reached the upstream


@pytest.mark.parametrize(
    ("sent", "passed_on"),
    [("\u00b2", "5"), ("1e3", "5"), ("Wed, 21 Oct 2026 07:28:00 GMT", "5"), ("86400000", "3600")],
    ids=["superscript-two", "not-an-integer", "http-date", "too-long"],
)
def test_an_upstream_retry_after_that_is_not_plain_seconds_gets_a_sane_one(
    own_proxy: httpx.Client, upstream: EmulatorControl, sent: str, passed_on: str
) -> None:
    """Only ASCII digits are seconds ("²" passes str.isdigit() but not int()), and a pause is capped."""
    upstream.fault(op="mint", status=429, retry_after=sent)

    response = mint(own_proxy)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == passed_on


def test_a_failing_upstream_opens_the_circuit_then_one_probe_closes_it(
    own_proxy: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="mint", drop=True, times=3)

    failed = mint(own_proxy)  # three dropped connections: the retries are used up, the circuit opens
    fast = mint(own_proxy)

    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_error"
    assert fast.status_code == 503 and fast.json()["error"]["code"] == "upstream_unavailable"
    assert int(fast.headers["retry-after"]) >= 1
    assert len(upstream.requests("mint")) == 3

    deadline = time.monotonic() + 10
    while (response := mint(own_proxy)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)  # the cooldown has to pass; each try answers at once without the upstream
    assert response.status_code == 200
    assert len(upstream.requests("mint")) == 4  # only the probe after the cooldown reached it


def test_a_500_from_one_workflow_does_not_open_the_circuit(own_proxy: httpx.Client, upstream: EmulatorControl) -> None:
    upstream.fault(op="run", status=500, times=5)

    statuses = [own_proxy.post("/api/workflows/story/run", json={"t": "x"}).status_code for _ in range(5)]

    assert statuses == [502] * 5
    assert mint(own_proxy).status_code == 200
