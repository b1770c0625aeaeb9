"""The runs of this process: admission, finding a run by id or chat, stopping one on any replica, and
the renewals that keep their slots (and notice a logout elsewhere).

Admission, in order: the user's output budget is not spent (read only), a stream slot is free, the
rate limit allows it. The rate limit is counted last, so a request refused for a full slot or a spent
budget does not also use up the user's rate; a refusal by the rate limit gives the slot back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from proxy.audit import AuditLog
from proxy.budget import OutputBudget
from proxy.events import RunEvents
from proxy.metrics import Metrics
from proxy.rate_limiter import RateLimiter
from proxy.runs.run import Run, RunRequest
from proxy.sessions import Session, SessionManager
from proxy.slots import Lease, StreamSlots
from proxy.storage import Storage, StorageUnavailable
from proxy.storage.runlog import ChunkLog, RunLogs, RunMeta
from proxy.token_pool import TokenSource
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.runs.follower import RunStream
    from proxy.tracing.spans import Tracing

logger = logging.getLogger("proxy.runs")

# Renewals in flight together, so a slow storage delays one round by a few round trips, not thousands.
RENEWALS_AT_ONCE = 100
# A run's log outlives its deadline by the resume window, and by this much for clock and write slack.
LOG_TTL_SLACK_SECONDS = 60.0
# How often a follower on another replica says it is still there (see `Run.followed_elsewhere`).
FOLLOW_SECONDS = 5.0
SHUTDOWN_WAIT_SECONDS = 5.0
STOP_REASONS = frozenset({"stopped", "replaced"})
MAX_CHAT_ID_CHARS = 200


@dataclass
class RunSettings:
    max_seconds: float
    grace_seconds: float
    resume_seconds: float
    max_bytes: int
    send_timeout: float


class RunManager:
    def __init__(
        self,
        settings: RunSettings,
        *,
        logs: RunLogs,
        storage: Storage,
        sessions: SessionManager,
        upstream: Upstream,
        tokens: TokenSource,
        slots: StreamSlots,
        limiter: RateLimiter,
        budget: OutputBudget,
        metrics: Metrics,
        events: RunEvents | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.max_seconds = settings.max_seconds
        self.grace_seconds = settings.grace_seconds
        self.resume_seconds = settings.resume_seconds
        self.max_bytes = settings.max_bytes
        self.send_timeout = settings.send_timeout
        self.logs = logs
        self.storage = storage
        self.sessions = sessions
        self.registry = sessions.streams
        self.audit: AuditLog = sessions.audit
        self.upstream = upstream
        self.tokens = tokens
        self.slots = slots
        self.limiter = limiter
        self.budget = budget
        self.metrics = metrics
        self.events = events  # None: no BFF_EVENTS_URL
        self.tracing = tracing
        self.live: dict[str, Run] = {}
        self.followers: set[RunStream] = set()
        # A follower elsewhere says it is there this often, and counts for twice as long.
        self.follow_seconds = min(FOLLOW_SECONDS, max(settings.grace_seconds / 2, 0.5))

    async def start(self, session: Session, request: RunRequest) -> Run:
        """Admit and start a run; raises the `ApiError` of the first check it fails."""
        admitting = self._admit(session, request)
        admitted = await (admitting if self.tracing is None else self.tracing.admission(admitting))
        meta, lease, headers, log = admitted
        # Started once the admission's span has ended: the run's spans are the request's children.
        run = self.live[meta.run_id] = Run(self, session, request, meta, lease, headers, log)
        return run

    async def _admit(
        self, session: Session, request: RunRequest
    ) -> tuple[RunMeta, Lease, dict[str, str], ChunkLog | None]:
        user_id, alias, counted = session.user.id, request.workflow.alias, session.limit_key
        await self.budget.ensure_left(counted)
        run_id = "run_" + secrets.token_urlsafe(16)
        lease = await self.slots.acquire(counted, holder=run_id)
        try:
            headers = await self.limiter.check("relay", counted, workflow=alias)
            log = None
            # A chat id too long to be one of ours is no chat: the answer is still followable by run id.
            chat_id = request.chat_id if request.chat_id and len(request.chat_id) <= MAX_CHAT_ID_CHARS else None
            meta = RunMeta(
                run_id,
                user_id,
                "msg_" + secrets.token_hex(12),
                alias,
                chat_id,
                started_at=time.time(),
                trace=None if self.tracing is None else self.tracing.traceparent(),
            )
            if request.streamed:
                if meta.chat_id is not None:  # a new message in a chat ends the chat's previous answer
                    previous = await self.logs.chat_run(user_id, alias, meta.chat_id)
                    if previous is not None:
                        await self.stop(previous, "replaced")
                ttl = self.max_seconds + self.resume_seconds + LOG_TTL_SLACK_SECONDS
                log = await self.logs.create(meta, ttl=ttl)
        except BaseException:
            await lease.release()
            raise
        return meta, lease, headers, log

    def forget(self, run: Run) -> None:
        self.live.pop(run.id, None)

    async def open_runs(self, session: Session) -> tuple[int, list[RunMeta]]:
        """The stream slots the session's user holds, on every replica, and of those the runs that can
        be followed (a `/run` call has no log), oldest first. Guests who share an address's slots
        (BFF_GUEST_LIMITS=ip) are shown only their own runs."""
        holders = await self.slots.holders(session.limit_key)
        found = await asyncio.gather(*(self.logs.meta(run_id) for run_id in holders))
        mine = [meta for meta in found if meta is not None and meta.user_id == session.user.id]
        return len(holders), sorted(mine, key=lambda meta: meta.started_at)

    async def owned(self, run_id: str, user_id: str) -> RunMeta | None:
        """The run's meta if `user_id` owns it and its log is still kept."""
        meta = await self.logs.meta(run_id)
        return meta if meta is not None and meta.user_id == user_id else None

    async def chat_run(self, session: Session, alias: str, chat_id: str) -> RunMeta | None:
        if len(chat_id) > MAX_CHAT_ID_CHARS:
            return None
        run_id = await self.logs.chat_run(session.user.id, alias, chat_id)
        return None if run_id is None else await self.owned(run_id, session.user.id)

    async def stop(self, run_id: str, reason: str = "stopped") -> None:
        """End a run on whichever replica holds it."""
        run = self.live.get(run_id)
        if run is not None:
            run.stop(reason)
            with anyio.move_on_after(SHUTDOWN_WAIT_SECONDS):
                await run.done.wait()
        else:
            await self.logs.send(reason, run_id)

    async def announce_follower(self, run_id: str) -> None:
        await self.logs.send("follow", run_id)

    def _on_control(self, kind: str, run_id: str) -> None:
        run = self.live.get(run_id)
        if run is None:
            return
        if kind in STOP_REASONS:
            run.stop(kind)
        elif kind == "follow":
            run.followed_elsewhere(2 * self.follow_seconds)

    async def listen_forever(self) -> None:
        await self.logs.listen(self._on_control)

    async def keep_forever(self) -> None:
        """Every third of the lease: renew every run's slot, check its session, and tell the other
        replicas that this one is still producing them. Runs for the life of the process."""
        lease_seconds = self.slots.lease_seconds
        while True:
            await anyio.sleep(lease_seconds / 3)
            runs = list(self.live.values())
            for start in range(0, len(runs), RENEWALS_AT_ONCE):
                async with anyio.create_task_group() as group:
                    for run in runs[start : start + RENEWALS_AT_ONCE]:
                        group.start_soon(_renew, run)
            try:
                await self.logs.heartbeat([run.id for run in runs if run.log is not None], lease_seconds)
            except StorageUnavailable:
                logger.warning("run heartbeat failed; retrying")

    async def watch_sends_forever(self) -> None:
        """Drop every follower whose client has taken no data for the send timeout (a client that
        stopped reading, with its socket's buffers full). Runs for the life of the process."""
        every = min(1.0, self.send_timeout / 4)
        while True:
            await anyio.sleep(every)
            now = time.monotonic()
            for follower in [
                f for f in self.followers if f.sending_since and now - f.sending_since > self.send_timeout
            ]:
                follower.drop()

    async def close(self) -> None:
        """At shutdown: end what is still running, and wait (briefly) for the ends to be written."""
        runs = list(self.live.values())
        for run in runs:
            run.stop("shutdown")
        with anyio.move_on_after(SHUTDOWN_WAIT_SECONDS):
            for run in runs:
                await run.done.wait()

    def observe(self, run: Run) -> None:
        metrics, stats = self.metrics, run.stats
        metrics.open_streams.dec()
        metrics.stream_ends.labels(stats.end).inc()
        metrics.chars_relayed.inc(stats.chars)
        metrics.duration.observe(time.monotonic() - stats.started_at)
        if stats.first_byte_at is not None:
            metrics.first_byte.observe(stats.first_byte_at - stats.started_at)
        if stats.end.startswith("client_gone"):
            stage = "before_first_byte" if stats.first_byte_at is None else "after_first_byte"
            metrics.disconnects.labels(stage).inc()


async def _renew(run: Run) -> None:
    try:
        await run.renew()
    except Exception:  # one run's surprise must not stop the renewals of every other one
        logger.exception("run renewal failed")
