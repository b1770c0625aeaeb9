"""Output budgets exact across replicas (issue 16): charged as the text flows, a batch at a time, so
the budget is exceeded by at most one batch per open run; `/run` is refused an answer that would
cross it; and a charge the storage cannot take is kept and applied when it is back.

Two `python -m proxy serve` processes share a real `redis-server`, and every figure the test checks
is what the clients received or what the storage holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from proxy.budget import BATCH_CHARS, COUNT_BATCH_CHARS, OutputBudget
from proxy.metrics import Metrics
from proxy.runs.ending import BUDGET_SPENT
from proxy.storage import MemoryStorage, Ranking
from tests.conftest import start_redis
from tests.servers import EmulatorControl, RedisServer, ServerProcess, browser, eventually, replicas_of
from tests.test_chat_protocols import sse_events, text_of

BUDGET = 20_000
CHUNK = "c" * 50
ANSWER = [CHUNK] * 800  # 40,000 characters, twice the budget, in chunks the size of a few tokens


def chat_body(chat_id: str) -> dict[str, Any]:
    return {"id": chat_id, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "go"}]}]}


def used(client: httpx.Client) -> int:
    value: int = client.get("/auth/session").json()["limits"]["daily_output_chars"]["used"]
    return value


@pytest.fixture
def replicas(emulator: ServerProcess, redis_server: RedisServer) -> Iterator[list[ServerProcess]]:
    with replicas_of(emulator.url, BFF_STORAGE_URL=redis_server.url, BFF_DAILY_OUTPUT_CHARS=str(BUDGET)) as servers:
        yield servers


def test_parallel_answers_on_two_replicas_overshoot_the_budget_by_at_most_a_batch_each(
    replicas: list[ServerProcess], upstream: EmulatorControl
) -> None:
    first, second = replicas
    runs = 4
    upstream.fault(op="stream", workflow="wf_tutor", chunks=ANSWER, delay=0.002, times=runs)
    with browser(first.url) as on_first:
        on_first.post("/auth/guest").raise_for_status()
        with browser(second.url, cookies=on_first.cookies) as on_second:
            clients = [on_first, on_second] * (runs // 2)
            with ThreadPoolExecutor(runs) as pool:
                answers = list(
                    pool.map(lambda n: clients[n].post("/api/chat/tutor", json=chat_body(f"c{n}")).text, range(runs))
                )
            eventually(lambda: used(on_first) > BUDGET, "the charges")
            total = used(on_second)

    events = [sse_events(answer) for answer in answers]
    delivered = sum(len(text_of(answer)) for answer in events)
    # Every answer ended at the budget, in-band, with what it had relayed so far kept.
    assert all(answer[-2:] == [{"type": "error", "errorText": BUDGET_SPENT}, "[DONE]"] for answer in events)
    # What the storage holds is exactly what the clients received, and the overshoot is bounded.
    assert total == delivered
    assert BUDGET <= total <= BUDGET + runs * (BATCH_CHARS + len(CHUNK))


def test_an_upstream_faster_than_the_reads_still_overshoots_by_at_most_a_batch(
    replicas: list[ServerProcess], upstream: EmulatorControl
) -> None:
    """A read holds everything that arrived since the last one (here tens of KB at once): the bound
    is still one batch, not one read."""
    first, _ = replicas
    upstream.fault(op="stream", workflow="wf_tutor", chunks=["y" * 3000] * 300, delay=0)
    with browser(first.url) as client:
        client.post("/auth/guest").raise_for_status()
        answer = sse_events(client.post("/api/chat/tutor", json=chat_body("fast")).text)
        eventually(lambda: used(client) > BUDGET, "the charges")
        total = used(client)

    assert answer[-2:] == [{"type": "error", "errorText": BUDGET_SPENT}, "[DONE]"]
    assert total == len(text_of(answer))
    assert BUDGET <= total <= BUDGET + BATCH_CHARS


def test_run_refuses_an_answer_that_would_cross_the_budget_and_charges_nothing_for_it(
    replicas: list[ServerProcess], upstream: EmulatorControl
) -> None:
    first, _ = replicas
    with browser(first.url) as client:
        client.post("/auth/guest").raise_for_status()
        upstream.fault(op="run", result_chars=BUDGET + 1)
        too_much = client.post("/api/workflows/tutor/run", json={"message": "x"})
        upstream.fault(op="run", result_chars=BUDGET)
        fits = client.post("/api/workflows/tutor/run", json={"message": "x"})
        after = used(client)

    assert (too_much.status_code, too_much.json()["error"]["code"]) == (429, "budget_exhausted")
    assert fits.status_code == 200
    assert after == BUDGET  # the refused answer cost nothing against the budget


def metric(server: ServerProcess, name: str, outcome: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf'^{name}\{{outcome="{outcome}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_charge_the_storage_cannot_take_is_kept_and_applied_when_it_is_back(
    emulator: ServerProcess, upstream: EmulatorControl, tmp_path: Path
) -> None:
    redis = start_redis(tmp_path)
    env = {"BFF_STORAGE_URL": redis.url, "BFF_DAILY_OUTPUT_CHARS": str(10 * BUDGET)}
    try:
        upstream.fault(op="stream", workflow="wf_tutor", chunks=ANSWER[:100], hold_after=1)
        with replicas_of(emulator.url, **env) as (server, other), browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()
            with client.stream("POST", "/api/chat/tutor", json=chat_body("down")) as response:
                body = response.iter_raw()
                head = next(body)
                redis.stop()  # the rest of the answer is charged while nothing can take the charge
                upstream.release()
                answer = text_of(sse_events((head + b"".join(body)).decode()))
            assert answer == "".join(ANSWER[:100])
            eventually(lambda: metric(server, "bff_budget_charged_chars_total", "deferred") > 0, "a deferred charge")
            redis.start()
            eventually(lambda: metric(server, "bff_budget_charged_chars_total", "settled") > 0, "the charge settling")
            with browser(other.url, cookies=client.cookies) as elsewhere:  # as every replica sees it
                eventually(lambda: elsewhere.get("/auth/session").status_code == 200, "the storage answering")
                assert used(elsewhere) == len(answer)
    finally:
        redis.stop()


# Without a budget, output is counted all the same, and nothing waits on the count


class SlowCounts(MemoryStorage):
    """Memory storage whose increments wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.go = anyio.Event()

    async def incr(self, key: str, amount: int, ttl: float, ranking: Ranking | None = None) -> int:
        self.waiting += 1
        await self.go.wait()
        return await super().incr(key, amount, ttl, ranking)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_without_a_budget_a_run_counts_in_the_background_one_charge_at_a_time(anyio_backend: str) -> None:
    storage = SlowCounts()
    budget = OutputBudget(storage, 0, metrics=Metrics())
    meter = budget.meter("ann")

    assert meter.room() > 10**9  # no batch boundaries to cut the answer at
    assert meter.add(BATCH_CHARS) is False  # a budget's batch is nothing here: no storage work yet
    await anyio.lowlevel.checkpoint()
    assert storage.waiting == 0
    assert meter.add(COUNT_BATCH_CHARS) is False  # due, but charged in the background: the relay goes on
    await wait_until(lambda: storage.waiting == 1)
    assert meter.add(COUNT_BATCH_CHARS) is False  # due again while the first is on its way: it waits for the next
    assert meter.add(7) is False
    await anyio.lowlevel.checkpoint()
    assert storage.waiting == 1

    storage.go.set()
    assert await meter.charge() is False  # the last charge waits for the one on its way, then adds the rest
    assert await budget.used("ann") == BATCH_CHARS + 2 * COUNT_BATCH_CHARS + 7
    day = datetime.now(UTC).date().isoformat()
    assert await storage.top_ranked(f"output:{day}", 10) == [("ann", BATCH_CHARS + 2 * COUNT_BATCH_CHARS + 7)]


async def wait_until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not check():
            await anyio.lowlevel.checkpoint()
