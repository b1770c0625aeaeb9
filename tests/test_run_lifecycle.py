"""A run's life in-process, against the fake upstream (tests/fake_upstream.py): how it ends, what its
log holds, and that it lets go of its slot and its upstream answer however it ends. No sockets: the
real-socket relay tests are in tests/test_relay.py and tests/test_runs.py."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from proxy.budget import OutputBudget
from proxy.errors import ApiError
from proxy.limits import parse_rate_limits
from proxy.metrics import Metrics
from proxy.rate_limiter import RateLimiter
from proxy.runs import RunManager, RunRequest, RunSettings
from proxy.runs.run import Run
from proxy.sessions import Session, SessionManager, User
from proxy.slots import StreamSlots
from proxy.storage import MemoryStorage
from proxy.storage.limits_memory import MovingWindowMemory
from proxy.storage.runlog import END, OPEN, TEXT, Entry, MemoryRunLogs
from proxy.token_pool import TokenSource
from proxy.upstream import RunResult
from proxy.workflows import Workflow
from tests.fake_upstream import FakeBody, FakeUpstream
from tests.servers import SESSION_SECRET

TUTOR = Workflow(alias="tutor", id="wf_tutor")
WAIT_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclasses.dataclass
class Harness:
    runs: RunManager
    upstream: FakeUpstream
    session: Session

    async def start(self, *, streamed: bool = True) -> Run:
        what = "stream:tutor" if streamed else "run:tutor"
        return await self.runs.start(self.session, RunRequest(TUTOR, {"message": "owls"}, what, streamed=streamed))

    async def finished(self, run: Run) -> str:
        with anyio.fail_after(WAIT_SECONDS):
            await run.done.wait()
        assert run.ending is not None
        return run.ending.reason

    async def open_slots(self) -> int:
        return await self.runs.slots.open(self.session.limit_key)


@asynccontextmanager
async def harness(
    *, max_seconds: float = 60.0, max_bytes: int = 1 << 20, daily_chars: int = 0, streams_per_user: int = 3
) -> AsyncIterator[Harness]:
    storage = MemoryStorage()
    metrics = Metrics()
    upstream = FakeUpstream()
    sessions = SessionManager(
        storage, [SESSION_SECRET], idle_seconds=1800, max_seconds=86400, cookie_secure=False, metrics=metrics
    )
    runs = RunManager(
        RunSettings(
            max_seconds=max_seconds, grace_seconds=20.0, resume_seconds=120.0, max_bytes=max_bytes, send_timeout=30.0
        ),
        logs=MemoryRunLogs(),
        storage=storage,
        sessions=sessions,
        upstream=upstream,
        tokens=TokenSource(upstream, ttl=60, pool_size=0),
        slots=StreamSlots(storage, streams_per_user),
        limiter=RateLimiter(MovingWindowMemory(), parse_rate_limits(""), metrics=metrics),
        budget=OutputBudget(storage, daily_chars, metrics=metrics),
        metrics=metrics,
    )
    session, _ = await sessions.start(User("user-1", "password"))
    try:
        yield Harness(runs, upstream, dataclasses.replace(session, limit_key="user-1"))
    finally:
        await runs.close()
        await storage.close()


async def log_of(run: Run) -> list[Entry]:
    assert run.log is not None
    return await run.log.read(0, wait=0)


def text_in(entries: list[Entry]) -> bytes:
    return b"".join(value for kind, value in entries if kind == TEXT)


@pytest.mark.anyio
async def test_a_run_read_to_the_end_is_complete_and_lets_go_of_its_slot_and_answer() -> None:
    async with harness() as h:
        body = FakeBody(b"Owls ", b"hunt at ", b"night.")
        h.upstream.streams.append(body)

        run = await h.start()
        assert await h.open_slots() == 1

        assert await h.finished(run) == "complete"
        entries = await log_of(run)
        assert entries[0][0] == OPEN and entries[-1][0] == END
        assert text_in(entries) == b"Owls hunt at night."
        assert body.closed
        assert await h.open_slots() == 0
        assert h.upstream.stream_calls[0].token == "pub_tok_1"  # a token minted for this run


@pytest.mark.anyio
async def test_an_upstream_cut_ends_the_run_as_upstream_cut_and_keeps_what_arrived() -> None:
    async with harness() as h:
        body = FakeBody(b"Owls hunt", cut=True)
        h.upstream.streams.append(body)

        run = await h.start()

        assert await h.finished(run) == "upstream_cut"
        assert text_in(await log_of(run)) == b"Owls hunt"
        assert body.closed
        assert await h.open_slots() == 0


@pytest.mark.anyio
async def test_a_stopped_run_ends_stopped_where_it_was_and_closes_its_upstream_answer() -> None:
    async with harness() as h:
        body = FakeBody(b"Owls ", held=True)  # the model goes on thinking after its first word
        h.upstream.streams.append(body)
        run = await h.start()
        with anyio.fail_after(WAIT_SECONDS):
            await body.read_all.wait()

        await h.runs.stop(run.id)

        assert await h.finished(run) == "stopped"
        assert run.ending is not None and run.ending.error is None  # a clean end
        assert text_in(await log_of(run)) == b"Owls "
        assert body.closed
        assert await h.open_slots() == 0


@pytest.mark.anyio
async def test_an_upstream_silent_past_the_deadline_ends_the_run_with_a_timeout() -> None:
    async with harness(max_seconds=0.2) as h:
        body = FakeBody(held=True)  # never answers
        h.upstream.streams.append(body)

        run = await h.start()

        assert await h.finished(run) == "deadline"
        assert run.ending is not None and run.ending.error is not None
        assert run.ending.error.code == "upstream_timeout"
        assert body.closed


@pytest.mark.anyio
async def test_an_answer_over_the_byte_cap_ends_the_run_as_too_large() -> None:
    async with harness(max_bytes=1024) as h:
        h.upstream.streams.append(FakeBody(b"a" * 1000, b"b" * 1000, held=True))

        run = await h.start()

        assert await h.finished(run) == "too_large"
        assert text_in(await log_of(run)) == b"a" * 1000


@pytest.mark.anyio
async def test_an_upstream_refusal_ends_the_run_with_the_upstream_error() -> None:
    async with harness() as h:
        h.upstream.streams.append(ApiError(402, "upstream_out_of_credits", "The upstream account has no credits left."))

        run = await h.start()

        assert await h.finished(run) == "refused:upstream_out_of_credits"
        assert run.ending is not None and run.ending.error is not None
        assert run.ending.error.status == 402
        assert await h.open_slots() == 0


@pytest.mark.anyio
async def test_the_run_that_crosses_the_daily_budget_ends_with_the_batch_that_crossed_it() -> None:
    async with harness(daily_chars=100) as h:
        h.upstream.streams.append(FakeBody(b"a" * 5000, b"b" * 5000))

        run = await h.start()

        assert await h.finished(run) == "budget"
        text = text_in(await log_of(run))
        assert 100 <= len(text) < 5000  # one batch, not the whole answer
        assert set(text) == {ord("a")}


@pytest.mark.anyio
async def test_a_user_at_the_stream_cap_is_refused_until_a_run_ends() -> None:
    async with harness(streams_per_user=1) as h:
        first_body = FakeBody(b"first", held=True)
        h.upstream.streams += [first_body, FakeBody(b"second")]
        first = await h.start()

        with pytest.raises(ApiError) as refused:
            await h.start()
        first_body.release()
        await h.finished(first)
        second = await h.start()

        assert refused.value.code == "too_many_streams"
        assert await h.finished(second) == "complete"


@pytest.mark.anyio
async def test_a_whole_answer_run_keeps_the_result_and_writes_no_log() -> None:
    async with harness() as h:
        h.upstream.runs.append(RunResult("Owls hunt at night.", ["https://example.org/owls"]))

        run = await h.start(streamed=False)

        assert await h.finished(run) == "complete"
        assert run.result == RunResult("Owls hunt at night.", ["https://example.org/owls"])
        assert run.log is None
        assert h.upstream.minted == 0  # `/run` takes the API key, not a stream token
