"""The runs of this process: admission, finding a run by id or chat, stopping one on any replica, and
the renewals that keep their slots (and notice a logout elsewhere).

Admission, in order: the user's output budget is not spent (read only), a stream slot is free, the
rate limit allows it. The rate limit is counted last, so a request refused for a full slot or a spent
budget does not also use up the user's rate; a refusal by the rate limit gives the slot back.

With Redis storage a relay's session and admission take one round trip (`open`): one script
(proxy/storage/admission_redis.py) checks the session, touches it when due, and runs those checks in
that order, atomically; whatever needs Python's judgement (a session that ended, IdP tokens to
refresh) takes the step-by-step way instead.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from limits import RateLimitItem
from starlette.requests import HTTPConnection

from proxy.audit import AuditLog
from proxy.budget import OutputBudget, spent, today
from proxy.events import RunEvents
from proxy.metrics import Metrics
from proxy.rate_limiter import NAMESPACE, RateLimiter
from proxy.runs.run import Run, RunRequest
from proxy.sessions import Session, SessionManager
from proxy.slots import Lease, StreamSlots
from proxy.storage import LIMITS_KEY_PREFIX, RedisStorage, Storage, StorageUnavailable
from proxy.storage.admission_redis import AdmissionAsk, Around, RedisAdmission, WindowAsk
from proxy.storage.redis import milliseconds
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
        # Memory storage keeps the step-by-step way: in process, it has no round trips to save.
        self.at_once = RedisAdmission(storage, LIMITS_KEY_PREFIX) if isinstance(storage, RedisStorage) else None

    async def open(self, connection: HTTPConnection, parse: Callable[[], Awaitable[RunRequest]]) -> Run:
        """The request's session, then its own checks (`parse`: the workflow, the body), then admission,
        as `sessions.require` followed by `start` would, but with Redis in one round trip where it can.
        Raises the `ApiError` of the first check it fails."""
        if self.at_once is None:
            session = await self.sessions.require(connection)
            return await self.start(session, await parse())
        key = self.sessions.signed_key(connection)
        if key is None:  # no cookie, or a forged or stale one: no storage asked
            raise self.sessions.unauthenticated(connection)
        try:
            request = await parse()
        except Exception:
            # Its session was looked up first: a session that has ended answers 401 before the
            # request's own 400 or 404, and a valid one is touched when due.
            await self.sessions.require(connection)
            raise
        admitting = self._admit_at_once(self.at_once, connection, key, request)
        admitted = await (admitting if self.tracing is None else self.tracing.admission(admitting))
        session, (meta, lease, headers, log) = admitted
        run = self.live[meta.run_id] = Run(self, session, request, meta, lease, headers, log)
        return run

    async def _admit_at_once(
        self, at_once: RedisAdmission, connection: HTTPConnection, key: str, request: RunRequest
    ) -> tuple[Session, tuple[RunMeta, Lease, dict[str, str], ChunkLog | None]]:
        sessions, alias = self.sessions, request.workflow.alias
        revocations_seen = self.registry.revocations  # before the lookup: a logout during it counts
        run_id = new_run_id()
        checks = self.limiter.checks("relay", alias)
        day = today()
        answer = await at_once.admit(
            AdmissionAsk(
                session_key=key,
                now=time.time(),
                idle_seconds=sessions.idle_seconds,
                touch_after=sessions.touch_after,
                refresh_margin=None if sessions.idp_refresh is None else sessions.idp_refresh.margin,
                guest_key=sessions.guest_limit_key(connection),
                daily_chars=self.budget.daily_chars,
                counter=Around.of(lambda counted: self.budget.key(counted, day)),
                lease=Around.of(self.slots.name),
                holder=run_id,
                cap=self.slots.limit,
                lease_ms=milliseconds(self.slots.lease_seconds),
                windows=[_window(scope, item) for scope, item in checks],
            )
        )
        if answer.outcome == "python":
            session = await sessions.require(connection)
            return session, await self._admit(session, request)
        if answer.record is None:  # "none": no such session
            raise sessions.unauthenticated(connection)
        session = sessions.opened(answer.record, revocations_seen, answer.limit_key)
        if answer.outcome == "budget":
            raise spent()
        if answer.outcome == "slot":
            raise self.slots.refusal()
        if answer.outcome == "rate":
            # The script took no slot; but if it ran twice (redis-py retries once when an answer is
            # lost), the first run may have: give back whatever this holder holds.
            await self.slots.taken(answer.limit_key, run_id).release()
            _, item = checks[answer.refused_by]
            raise self.limiter.refusal("relay", item, answer.windows[0])
        lease = self.slots.taken(answer.limit_key, run_id)
        headers = RateLimiter.headers([(item, stats) for (_, item), stats in zip(checks, answer.windows, strict=True)])
        return session, await self._opened(session, request, run_id, lease, headers)

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
        alias, counted = request.workflow.alias, session.limit_key
        await self.budget.ensure_left(counted)
        run_id = new_run_id()
        lease = await self.slots.acquire(counted, holder=run_id)
        try:
            headers = await self.limiter.check("relay", counted, workflow=alias)
        except BaseException:
            await lease.release()
            raise
        return await self._opened(session, request, run_id, lease, headers)

    async def _opened(
        self, session: Session, request: RunRequest, run_id: str, lease: Lease, headers: dict[str, str]
    ) -> tuple[RunMeta, Lease, dict[str, str], ChunkLog | None]:
        """An admitted run's meta and log (a new message in a chat first ends the chat's previous
        answer); the slot is given back if they cannot be made."""
        user_id, alias = session.user.id, request.workflow.alias
        try:
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


def _window(scope: str, item: RateLimitItem) -> WindowAsk:
    """A moving-window limit to count a relay against, keyed as `RateLimiter.check` keys it."""
    return WindowAsk(Around.of(lambda counted: item.key_for(NAMESPACE, scope, counted)), item.amount, item.get_expiry())


def new_run_id() -> str:
    return "run_" + secrets.token_urlsafe(16)


async def _renew(run: Run) -> None:
    try:
        await run.renew()
    except Exception:  # one run's surprise must not stop the renewals of every other one
        logger.exception("run renewal failed")
