"""Per-user rate limits (CONTRACT B5, B8): counted per user, per client IP before sign-in, per workflow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from proxy.errors import ApiError
from proxy.limits import parse_rate_limits
from proxy.slots import StreamSlots
from proxy.storage import MemoryStorage
from tests.servers import EmulatorControl, ServerProcess, browser, guest_of, start_proxy

LIMITS = "mint=3/minute;relay=2/minute;login=4/minute"
WORKFLOWS_TOML = """
[workflows.tutor]
id = "wf_tutor"

[workflows.story]
id = "wf_story"
rate_limit = "1/minute"
"""


@pytest.fixture
def limited(emulator: ServerProcess, upstream: EmulatorControl, tmp_path: Path) -> Iterator[ServerProcess]:
    workflows = tmp_path / "workflows.toml"
    workflows.write_text(WORKFLOWS_TOML)
    server = start_proxy(emulator.url, BFF_RATE_LIMITS=LIMITS, BFF_WORKFLOWS="", BFF_WORKFLOWS_FILE=str(workflows))
    yield server
    server.stop()


def assert_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response.headers["x-ratelimit-limit"]


def test_mints_are_limited_per_user(limited: ServerProcess, upstream: EmulatorControl) -> None:
    with guest_of(limited.url) as alice, guest_of(limited.url) as bob:
        answers = [alice.post("/api/token", json={"workflow": "tutor"}) for _ in range(4)]
        bobs = bob.post("/api/token", json={"workflow": "tutor"})

    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    assert [a.headers["x-ratelimit-remaining"] for a in answers[:3]] == ["2", "1", "0"]
    assert_limited(answers[3])
    assert bobs.status_code == 200  # another user has a budget of their own
    assert len(upstream.requests("mint")) == 4  # the refused mint never reached the upstream


def test_relays_are_limited_per_user_and_bad_requests_cost_nothing(
    limited: ServerProcess, upstream: EmulatorControl
) -> None:
    with guest_of(limited.url) as client:
        refused = client.post("/api/workflows/tutor/stream", json={"message": 5})
        first = client.post("/api/workflows/tutor/stream", json={"message": "a"})
        second = client.post("/api/workflows/tutor/run", json={"message": "b"})
        third = client.post("/api/workflows/tutor/stream", json={"message": "c"})

    assert refused.status_code == 422
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-remaining"] == "1"
    assert_limited(third)
    assert len(upstream.requests("stream")) == 1


def test_a_workflow_can_have_a_tighter_limit_of_its_own(limited: ServerProcess) -> None:
    with guest_of(limited.url) as client:
        first = client.post("/api/workflows/story/run", json={"topic": "a"})
        second = client.post("/api/workflows/story/run", json={"topic": "b"})
        other = client.post("/api/workflows/tutor/run", json={"message": "c"})

    assert first.status_code == 200
    assert_limited(second)
    assert other.status_code == 200


def test_sign_ins_are_limited_per_client_ip(limited: ServerProcess) -> None:
    with browser(limited.url) as client:
        answers = [client.post("/auth/guest") for _ in range(5)]
        spoofed = client.post("/auth/guest", headers={"X-Forwarded-For": "203.0.113.9"})

    assert [a.status_code for a in answers[:4]] == [200] * 4
    assert_limited(answers[4])
    assert_limited(spoofed)  # an untrusted peer cannot pick another IP to count against


def test_the_session_shows_the_limits(limited: ServerProcess) -> None:
    with guest_of(limited.url) as client:
        limits = client.get("/auth/session").json()["limits"]

    assert limits["mint"] == "3 per 1 minute"
    assert limits["relay"] == "2 per 1 minute"
    assert limits["max_concurrent_streams"] == 100  # the test proxies allow 100


# Stream slots are renewed by one task per process, for as long as their relay runs


class RenewalRecorder(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.renewed: list[str] = []  # holders, in order
        self._renewal = anyio.Event()

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        self.renewed.append(holder)
        self._renewal.set()
        self._renewal = anyio.Event()
        return await super().renew_lease(name, holder, ttl)

    async def renewals(self, count: int) -> None:
        with anyio.fail_after(30):
            while len(self.renewed) < count:
                await self._renewal.wait()


@pytest.mark.anyio
async def test_a_held_slot_outlives_its_lease_by_renewals_and_a_released_one_is_not_renewed() -> None:
    storage = RenewalRecorder()
    slots = StreamSlots(storage, 2, lease_seconds=0.2)
    running, ended = await slots.acquire("u1"), await slots.acquire("u1")
    await ended.release()
    for _ in range(3):  # past the lease three times over: only the renewals keep it
        await anyio.sleep(0.1)
        await running.renew()
        await ended.renew()
    assert await slots.open("u1") == 1
    assert set(storage.renewed) == {running._holder, ended._holder}
    await running.release()
    assert await slots.open("u1") == 0


class Lapsing(MemoryStorage):
    """Lets the leases taken so far lapse, as a storage outage longer than the lease would."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: list[tuple[str, str]] = []

    async def acquire_lease(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        self.holders.append((name, holder))
        return await super().acquire_lease(name, holder, limit, ttl)

    async def lapse(self) -> None:
        for name, holder in self.holders:
            await self.release_lease(name, holder)


@pytest.mark.anyio
async def test_a_running_streams_lapsed_slot_is_taken_back_even_above_the_cap() -> None:
    storage = Lapsing()
    slots = StreamSlots(storage, 1)
    running = await slots.acquire("u1")
    await storage.lapse()
    later = await slots.acquire("u1")  # the lapsed place was free
    await running.renew()
    assert await slots.open("u1") == 2  # both running streams count again
    with pytest.raises(ApiError) as refused:
        await slots.acquire("u1")
    assert refused.value.code == "too_many_streams"
    await running.release()
    await later.release()
    assert await slots.open("u1") == 0


class SlowRenewal(MemoryStorage):
    """Holds each renewal until `go` is set: the stream can end (and release) meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.renewing, self.go = anyio.Event(), anyio.Event()

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        self.renewing.set()
        await self.go.wait()
        return await super().renew_lease(name, holder, ttl)


@pytest.mark.anyio
async def test_a_renewal_that_loses_the_race_with_the_release_does_not_take_the_slot_back() -> None:
    storage = SlowRenewal()
    slots = StreamSlots(storage, 1)
    lease = await slots.acquire("u1")
    async with anyio.create_task_group() as group:
        group.start_soon(lease.renew)
        await storage.renewing.wait()
        await lease.release()  # the stream ended, and its release reached storage first
        storage.go.set()
    assert await slots.open("u1") == 0  # not left held by nobody until the lease runs out


def test_rate_limit_names_left_out_keep_their_defaults() -> None:
    """Setting only the relay limit must not switch off the sign-in limit (which bounds guest sign-ups)."""
    limits = parse_rate_limits("relay=5/minute,100/day")

    assert {name: [str(item) for item in items] for name, items in limits.items()} == {
        "mint": ["30 per 1 minute"],
        "relay": ["5 per 1 minute", "100 per 1 day"],
        "login": ["10 per 1 minute"],
    }
