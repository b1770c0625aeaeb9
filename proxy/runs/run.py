"""A run: one relayed generation, owned by a user (and a chat), not by the socket that asked for it.

The run holds what it was admitted with (a stream slot, the rate-limit headers), mints, reads the
upstream and appends what it reads to its chunk log, charging the output budget as it goes (in
batches: proxy/budget.py), all under one deadline. It writes to no
socket: followers (proxy/runs/follower.py) read the log, so nothing a client does or fails to do
can keep a run, its slot or its upstream connection alive past its deadline.

It ends in exactly one way (proxy/runs/ending.py): finished, stopped, its session revoked, the
service shutting down, the deadline, the upstream failing, or, when nobody follows it any more, at
the end of `BFF_RESUME_GRACE_SECONDS`, or its budget crossed. However it ends, in this order: the log
gets its end (every follower learns it), the slot is released, the budget gets the last batch, and it
is counted and audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from proxy.context import request_context
from proxy.errors import ApiError
from proxy.events import RunEnded
from proxy.runs.ending import Ending
from proxy.sessions import Session
from proxy.slots import Lease
from proxy.storage import StorageUnavailable
from proxy.storage.runlog import MAX_ENTRIES, OPEN_ENTRY, TEXT, ChunkLog, RunMeta, utf8_chars
from proxy.upstream import RunResult, UpstreamBody, UpstreamCut
from proxy.workflows import Workflow

if TYPE_CHECKING:
    from proxy.runs.manager import RunManager
    from proxy.tracing.spans import RunTrace

logger = logging.getLogger("proxy.runs")

# While the upstream sends back to back, a run gives the loop a turn after this many bytes.
YIELD_EVERY_BYTES = 64 * 1024


@dataclass(frozen=True)
class RunRequest:
    """What a route asks to run: a workflow with its inputs, described for logs (`chat:tutor:ui`)."""

    workflow: Workflow
    inputs: dict[str, str]
    what: str
    chat_id: str | None = None
    streamed: bool = True  # False: `/run`, the whole answer at once, with no log


@dataclass
class RunStats:
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    upstream_at: float | None = None  # when the stream request went to the upstream
    bytes_in: int = 0
    chars: int = 0  # characters of generated text: what output budgets are charged
    end: str = "running"


class Run:
    def __init__(
        self,
        runs: RunManager,
        session: Session,
        request: RunRequest,
        meta: RunMeta,
        lease: Lease,
        headers: dict[str, str],
        log: ChunkLog | None,
    ) -> None:
        self.id = meta.run_id
        self.meta = meta
        self.request = request
        self.session = session
        self.lease = lease
        self.headers = headers  # X-RateLimit-*, for the response that started it
        self.log = log
        self.stats = RunStats()
        self.ending: Ending | None = None
        self.result: RunResult | None = None  # `/run` only
        self.done = asyncio.Event()
        self._runs = runs
        self._stop_reason: str | None = None
        self._scope: anyio.CancelScope | None = None
        self._body: UpstreamBody | None = None
        self._followers = 0
        self._idle_since = 0.0  # when the last follower here left
        self._remote_until = 0.0  # a follower on another replica said it is there until then
        self._grace: asyncio.TimerHandle | None = None
        self._request_id = request_context().request_id
        self._meter = runs.budget.meter(session.limit_key) if log is not None else None
        self.trace: RunTrace | None = runs.tracing.run(request, meta) if runs.tracing is not None else None
        self._task = asyncio.get_running_loop().create_task(self._life())

    # For the registry that logout stops runs through (proxy/streams.py)

    @property
    def session_key(self) -> str:
        return self.session.key

    @property
    def user_id(self) -> str:
        return self.session.user.id

    # Followers and the grace period

    def attach(self) -> None:
        self._followers += 1
        self._cancel_grace()
        if self.trace is not None:
            self.trace.followed()

    def detach(self) -> None:
        self._followers -= 1
        if self._followers == 0 and self.ending is None:
            self._idle_since = time.monotonic()
            self._wait_for_follower()

    def followed_elsewhere(self, seconds: float) -> None:
        """A follower on another replica is reading this run, and says so again within `seconds`."""
        self._remote_until = time.monotonic() + seconds
        if self._followers == 0 and self.ending is None:
            self._wait_for_follower()

    def _wait_for_follower(self) -> None:
        """Nobody follows the run: a streamed run waits the grace period for a follower (a reload,
        another tab), counted from when the last one left, then stops, so that an abandoned answer
        costs no more than that."""
        self._cancel_grace()
        if self._followers or self.ending is not None:
            return
        grace = self._runs.grace_seconds if self.log is not None else 0.0
        wait = max(self._idle_since, self._remote_until) + grace - time.monotonic()
        if wait <= 0:
            self.stop("client_gone")
        else:
            self._grace = asyncio.get_running_loop().call_later(wait, self._wait_for_follower)

    def _cancel_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    # Ending

    def stop(self, reason: str) -> None:
        """End the run early; the first reason given is the one that counts."""
        if self.ending is not None:
            return
        if self._stop_reason is None:
            self._stop_reason = reason
            if self.trace is not None:
                self.trace.stopped(reason)
        if self._scope is not None:
            self._scope.cancel()

    async def renew(self) -> None:
        """Keep the slot, and end the run if its session ended (a logout on another replica)."""
        await self.lease.renew()
        try:
            valid = await self._runs.storage.get_session(self.session.key) is not None
        except StorageUnavailable:  # not knowing is no reason to cut an answer
            valid = True
        if not valid:
            self.stop("revoked")

    async def _life(self) -> None:
        runs = self._runs
        runs.registry.add(self)
        if self.log is not None:  # the stream metrics count streams; `/run` has its request counts
            runs.metrics.open_streams.inc()
        runs.audit.record("relay.start", self.session.key, user_id=self.meta.user_id, relay=self.request.what)
        ending = Ending.of("failed")
        try:
            with anyio.move_on_after(runs.max_seconds) as scope:
                self._scope = scope
                if self._stop_reason is not None:
                    scope.cancel()
                ending = await self._generate()
            if scope.cancelled_caught:
                reason = self._stop_reason or "deadline"
                if reason == "client_gone" and self.log is not None and self.stats.first_byte_at is None:
                    reason = "client_gone_early"
                ending = Ending.of(reason)
        finally:
            with anyio.CancelScope(shield=True):
                await self._end(ending)

    async def _generate(self) -> Ending:
        runs, request = self._runs, self.request
        try:
            # Registered by now, so a logout from here on stops the run; one since the session check
            # ends it before anything is minted.
            if not await runs.sessions.still_valid(self.session):
                return Ending.of("revoked")
            trace = self.trace
            if self.log is None:
                asked = runs.upstream.run(
                    request.workflow.id, request.inputs, max_bytes=runs.max_bytes, request_id=self._request_id
                )
                self.result = await (asked if trace is None else trace.upstream(asked))
                self.stats.first_byte_at = time.monotonic()
                # Charged before it is sent, and only if it fits: an answer that would cross the
                # budget is refused (429 budget_exhausted), not delivered.
                await runs.budget.charge_whole(self.session.limit_key, len(self.result.result))
                self.stats.chars = len(self.result.result)
                return Ending.of("complete")
            taken = runs.tokens.take(request_id=self._request_id)
            minted = await (taken if trace is None else trace.mint(taken))
            self.stats.upstream_at = time.monotonic()
            opened = runs.upstream.open_stream(
                request.workflow.id, minted.token, request.inputs, request_id=self._request_id
            )
            self._body = await (opened if trace is None else trace.upstream(opened))
            return await self._relay(self._body, self.log)
        except ApiError as error:
            return Ending.refused(error)
        except UpstreamCut as exc:
            logger.warning("upstream stream broke off: %s", exc)
            runs.metrics.upstream_errors.labels("cut").inc()
            if self._body is not None and self.stats.first_byte_at is None:
                self._observe_first_chunk("cut", time.monotonic())
            return Ending.of("upstream_cut")
        except Exception:
            logger.exception("run failed")
            return Ending.of("failed")
        finally:
            if self._body is not None:
                # Closing must finish even when we are being cancelled, or the connection leaks.
                with anyio.CancelScope(shield=True):
                    await self._body.aclose()

    async def _relay(self, body: UpstreamBody, log: ChunkLog) -> Ending:
        # Before the answer's headers go out (its run id with them): any replica can find the run by
        # then, to stop or resume it. Written long since, but for a Redis slower than the upstream.
        await log.shared()
        log.append(OPEN_ENTRY)
        stats, max_bytes, meter = self.stats, self._runs.max_bytes, self._meter
        unyielded = 0
        while data := await body.read_chunk():
            unyielded += len(data)
            if self._stop_reason is not None or unyielded >= YIELD_EVERY_BYTES:
                # A read that finds data waiting never suspends: while the upstream sends back to back,
                # nothing else on the loop would run (not even the watch that sees the client leave),
                # and a stop would wait for the burst's end. So the run yields now and then, and at
                # once when it was stopped, which is where the cancellation is taken.
                unyielded = 0
                await anyio.lowlevel.checkpoint()
            if stats.first_byte_at is None:
                stats.first_byte_at = time.monotonic()
                self._observe_first_chunk("ok", stats.first_byte_at)
                if self.trace is not None:
                    self.trace.first_chunk()
            stats.bytes_in += len(data)
            if stats.bytes_in > max_bytes or len(log) >= MAX_ENTRIES:
                return Ending.of("too_large")
            while data:
                # Charged as it flows, a batch at a time: the run that crosses the budget ends here.
                # A read holds whatever arrived since the last one, so with a budget it is relayed in
                # pieces no larger than the batch has room for: the overshoot stays within one batch.
                room = len(data) if meter is None else meter.room()
                piece, data = data[:room], data[room:]
                chars = utf8_chars(piece)
                stats.chars += chars
                log.append((TEXT, piece))
                if meter is not None and meter.add(chars) and await meter.charge():
                    return Ending.of("budget")
        return Ending.of("complete")

    def _observe_first_chunk(self, outcome: str, at: float) -> None:
        """Once a run: its stream's first chunk came, or its answer broke off before one did."""
        if self.stats.upstream_at is not None:
            self._runs.metrics.upstream_first_chunk.labels("stream", outcome).observe(at - self.stats.upstream_at)

    async def _end(self, ending: Ending) -> None:
        runs, stats = self._runs, self.stats
        self.ending = ending
        stats.end = ending.reason
        self._cancel_grace()
        if self.trace is not None:
            self.trace.end(ending, stats.chars)
        runs.registry.discard(self)
        if self.log is not None:
            await self.log.close(ending.entry(), runs.resume_seconds)
        self.done.set()
        runs.forget(self)
        await self.lease.release()
        if self.log is not None:
            runs.observe(self)
        if self._meter is not None:
            await self._meter.charge()  # what the last batch left
        runs.audit.record(
            "relay.end",
            self.session.key,
            user_id=self.meta.user_id,
            relay=self.request.what,
            run_id=self.id,
            end=ending.reason,
            chars=stats.chars,
            duration_ms=round((time.monotonic() - stats.started_at) * 1000, 1),
        )
        if runs.events is not None:
            runs.events.ended(self._ended_event(ending, include_text=runs.events.include_text))

    def _ended_event(self, ending: Ending, *, include_text: bool) -> RunEnded:
        stats, now = self.stats, time.monotonic()
        text = None
        if include_text:  # what the run produced: the log's text, or the answer `/run` sent
            if self.log is not None:
                text = self.log.text().decode(errors="replace")
            else:
                text = self.result.result if self.result is not None and ending.reason == "complete" else ""
        first_byte = stats.first_byte_at
        return RunEnded(
            run_id=self.id,
            user_id=self.meta.user_id,
            workflow=self.meta.alias,
            chat_id=self.meta.chat_id,
            end=ending.reason,
            chars=stats.chars,
            started_at=time.time() - (now - stats.started_at),
            first_byte_ms=None if first_byte is None else round((first_byte - stats.started_at) * 1000, 1),
            duration_ms=round((now - stats.started_at) * 1000, 1),
            text=text,
        )
