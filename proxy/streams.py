"""The runs going on in this process, by session and by user, so that logout can end them (R9).

A run registers itself for as long as it goes on. `POST /auth/logout` stops the runs of
that session and `POST /auth/logout-all` those of every session of the user. The registry is per
process: a run on another replica learns of the logout when its stream slot is next renewed
(`RunManager.keep_forever`, within a third of `BFF_STREAM_LEASE_SECONDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class RunningStream(Protocol):
    """A run, as the registry sees it. (The run itself, not an entry pointing back at it: an entry
    holding `run.stop` made every finished run a reference cycle for the garbage collector.)"""

    @property
    def session_key(self) -> str: ...

    @property
    def user_id(self) -> str: ...

    def stop(self, reason: str) -> None:
        """End the run: "revoked" (logout) or "shutdown" (the drain deadline passed)."""


@dataclass
class StreamRegistry:
    _running: set[RunningStream] = field(default_factory=set)
    # How many logouts this process has handled: a run whose session was checked before the latest
    # one may belong to a session that ended before the run registered (`SessionManager.still_valid`).
    revocations: int = 0
    # Set by `stop_all` (the drain deadline): a run that registers after it is stopped at once.
    ended: str | None = None

    def add(self, entry: RunningStream) -> None:
        self._running.add(entry)
        if self.ended is not None:  # e.g. a request still being admitted at the drain deadline
            entry.stop(self.ended)

    def discard(self, entry: RunningStream) -> None:
        self._running.discard(entry)

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
