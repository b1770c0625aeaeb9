"""The relays running in this process, by session and by user, so that logout can end them (R9).

A relay registers a `stop` callback for as long as it runs. `POST /auth/logout` stops the relays of
that session and `POST /auth/logout-all` those of every session of the user. The registry is per
process: with several replicas a relay on another replica learns of the logout when its stream slot
is next renewed (`Lease.watch` in proxy/limits.py, within a third of `BFF_STREAM_LEASE_SECONDS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio

from proxy.audit import AuditLog

# Called with why the relay must end: "revoked" (logout) or "shutdown" (the drain deadline passed).
Stop = Callable[[str], None]
Outcome = Callable[[], str]


@dataclass(eq=False)
class RunningStream:
    session_key: str
    user_id: str
    stop: Stop


@dataclass
class StreamRegistry:
    audit: AuditLog
    _running: set[RunningStream] = field(default_factory=set)
    # How many logouts this process has handled: a relay whose session was checked before the latest
    # one may belong to a session that ended before the relay registered (`SessionManager.still_valid`).
    revocations: int = 0
    # Set by `stop_all` (the drain deadline): a relay that registers after it is stopped at once.
    ended: str | None = None

    def running(self, owner: StreamOwner, stop: Stop, outcome: Outcome) -> Running:
        return Running(self, owner, RunningStream(owner.session_key, owner.user_id, stop), outcome)

    def stop_session(self, session_key: str) -> int:
        self.revocations += 1
        return self._stop([entry for entry in self._running if entry.session_key == session_key], "revoked")

    def stop_user(self, user_id: str) -> int:
        self.revocations += 1
        return self._stop([entry for entry in self._running if entry.user_id == user_id], "revoked")

    def stop_all(self, reason: str) -> int:
        self.ended = reason
        return self._stop(list(self._running), reason)

    def _stop(self, entries: list[RunningStream], reason: str) -> int:
        for entry in entries:
            entry.stop(reason)
        return len(entries)


class Running:
    """While a relay runs: registered, so logout can stop it, and its start and end audited.

    A class rather than a generator-based context manager: one of these lives as long as its stream,
    and a suspended generator frame costs several times its size on every open stream."""

    __slots__ = ("entry", "outcome", "owner", "registry")

    def __init__(self, registry: StreamRegistry, owner: StreamOwner, entry: RunningStream, outcome: Outcome) -> None:
        self.registry, self.owner, self.entry, self.outcome = registry, owner, entry, outcome

    def __enter__(self) -> None:
        owner, registry = self.owner, self.registry
        registry._running.add(self.entry)
        registry.audit.record("relay.start", owner.session_key, user_id=owner.user_id, relay=owner.what)
        if registry.ended is not None:  # e.g. a request still being admitted at the drain deadline
            self.entry.stop(registry.ended)

    def __exit__(self, *exc: object) -> None:
        owner = self.owner
        self.registry._running.discard(self.entry)
        end = self.outcome()
        self.registry.audit.record("relay.end", owner.session_key, user_id=owner.user_id, relay=owner.what, end=end)


@dataclass(frozen=True)
class StreamOwner:
    """Whose relay this is; handed to `RelayResponse` so the relay can be found and stopped."""

    registry: StreamRegistry
    session_key: str
    user_id: str
    what: str

    def running(self, stop: Stop, outcome: Outcome) -> Running:
        return self.registry.running(self, stop, outcome)

    @contextmanager
    def cancellable(self) -> Iterator[Stopped]:
        """Run a non-streaming upstream call so that logout, shutdown or `Stopped.stop` cancels it;
        afterwards the yielded `Stopped` says whether, and why, it was."""
        stopped = Stopped()
        outcome = "failed"
        with stopped.scope, self.running(stopped.stop, lambda: stopped.reason or outcome):
            yield stopped
            outcome = "complete"


@dataclass
class Stopped:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reason: str | None = None  # the first reason given to stop()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()
