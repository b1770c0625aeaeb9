"""`BFF_TOKEN_POOL`: pre-minted stream tokens, each given to exactly one caller and never stale."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from proxy.emulator import generate_text
from proxy.token_pool import TokenSource
from proxy.upstream import MintedToken
from proxy.upstream.client import MINT_ATTEMPTS
from tests.servers import EmulatorControl, ServerProcess, proxy_with


@pytest.fixture
def pooled(emulator: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    with proxy_with(emulator.url, BFF_TOKEN_POOL="2") as client:
        yield client


def relay(client: httpx.Client, topic: str) -> None:
    response = client.post("/api/workflows/tutor/stream", json={"message": topic})
    assert response.status_code == 200
    assert response.text == generate_text("wf_tutor", {"message": topic})


def test_after_demand_a_relay_uses_a_token_minted_before_it_was_asked_for(
    pooled: httpx.Client, upstream: EmulatorControl
) -> None:
    relay(pooled, "first")  # the pool is empty: minted on demand, and demand is now known
    upstream.wait(kind="mint", count=2)  # the background refill has minted one ahead
    events_before = len(upstream.events())

    relay(pooled, "second")

    second_token = upstream.requests("stream")[1]["query"]["token"]
    minted_at = {event["token"]: event["seq"] for event in upstream.events(kind="mint")}
    assert minted_at[second_token] <= events_before  # minted before the second relay was even sent


def test_every_pooled_token_is_used_once(pooled: httpx.Client, upstream: EmulatorControl) -> None:
    for index in range(6):
        relay(pooled, f"topic {index}")  # a reused token would be refused by the upstream

    streams = upstream.requests("stream")
    assert len({request["query"]["token"] for request in streams}) == 6


def test_token_mode_takes_from_the_pool_unless_a_shorter_ttl_is_asked(
    pooled: httpx.Client, upstream: EmulatorControl
) -> None:
    first = pooled.post("/api/token", json={"workflow": "tutor"}).json()
    upstream.wait(kind="mint", count=2)
    pooled_token = pooled.post("/api/token", json={"workflow": "tutor"}).json()
    short = pooled.post("/api/token", json={"workflow": "tutor", "ttl": 5}).json()

    assert len({first["token"], pooled_token["token"], short["token"]}) == 3
    assert 1 <= pooled_token["ttl"] <= 60
    assert short["ttl"] == 5
    # Minted to order (the background refill mints with the configured TTL, 60).
    assert [m["query"]["ttl"] for m in upstream.requests("mint")].count("5") == 1


def test_the_refill_outlives_an_unreadable_mint_answer(pooled: httpx.Client, upstream: EmulatorControl) -> None:
    """The refill shares the lifespan's task group: had the error escaped it, the HTTP client would be
    closed under a server still serving, and every later relay would fail."""
    # The relay's own mint and the refill's first, each with its retries.
    upstream.fault(op="mint", garble=True, times=2 * MINT_ATTEMPTS)

    failed = pooled.post("/api/workflows/tutor/stream", json={"message": "first"})
    upstream.wait(kind="mint", count=1)  # after a back-off, the refill minted ahead after all

    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_error"
    relay(pooled, "second")
    assert len(upstream.requests("mint")) >= 3


class FailingOnceUpstream:
    """Its first mint raises what no upstream error should be; then it mints."""

    def __init__(self) -> None:
        self.minted = anyio.Event()

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        if not hasattr(self, "failed"):
            self.failed = True
            raise RuntimeError("surprise")
        self.minted.set()
        return MintedToken(token="pub_tok_after", ttl=ttl, expires_at=time.time() + ttl)


def test_the_refill_backs_off_and_goes_on_after_an_unexpected_error() -> None:
    async def scenario() -> int:
        upstream = FailingOnceUpstream()
        source = TokenSource(upstream, ttl=60, pool_size=1)  # type: ignore[arg-type]
        source._taken.append(time.monotonic())  # demand for one token
        async with anyio.create_task_group() as group:
            group.start_soon(source.refill_forever)
            with anyio.fail_after(10):
                await upstream.minted.wait()
            group.cancel_scope.cancel()
        return len(source)

    assert anyio.run(scenario) == 1


class CountingUpstream:
    """Stands in for the upstream client in the pool's unit tests: mints tokens that expire on demand."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.minted = 0

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        self.minted += 1
        return MintedToken(token=f"pub_tok_{self.minted}", ttl=ttl, expires_at=time.time() + self.ttl)


def test_a_token_too_close_to_expiry_is_never_handed_out() -> None:
    async def scenario() -> tuple[str, int]:
        upstream = CountingUpstream(ttl=1.0)  # every token expires inside the safety margin
        source = TokenSource(upstream, ttl=60, pool_size=2)  # type: ignore[arg-type]
        source._pool.append(MintedToken("pub_tok_stale", 60, time.time() + 1.0))
        token = await source.take()
        return token.token, upstream.minted

    token, minted = anyio.run(scenario)

    assert token == "pub_tok_1"  # the stale pooled token was dropped and a fresh one minted
    assert minted == 1


def test_an_idle_process_keeps_no_tokens() -> None:
    source = TokenSource(CountingUpstream(ttl=60), ttl=60, pool_size=5)  # type: ignore[arg-type]

    assert source.target() == 0
