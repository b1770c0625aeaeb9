"""The storage interface shared by every backend: memory for one process, Redis for many replicas.

Four kinds of state live here, each with its own expiry rule:
- sessions, forgotten at their absolute `expires_at`;
- leases (a named pool of at most `limit` holders, each holding for `ttl` seconds unless renewed), for
  caps such as concurrent streams: a replica that dies without releasing loses its leases when they
  expire, so a slot can never leak for longer than one ttl;
- counters, incremented atomically and forgotten `ttl` seconds after their first increment, for budgets;
  an increment can also add to the counter's entry in a ranking (a sorted set of totals, with the same
  expiry rule), in the same atomic step: a day's output per user, for the operator's top users.
- an outbox of events waiting to be delivered (run-end webhooks, proxy/events/): each is claimed by one
  deliverer at a time for a lease, and stays until it is deleted, so a replica that dies mid-delivery
  leaves it to another one when the lease lapses.

Every operation is atomic in its backend, so the answers are exact across replicas sharing one Redis.
A backend that cannot be reached raises `StorageUnavailable`, which answers 503 `storage_unavailable`:
sign-in and relays fail closed rather than run without the state that enforces sessions and limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.errors import STORAGE_UNAVAILABLE, ApiError

RETRY_AFTER_SECONDS = 5


class StorageUnavailable(ApiError):
    """The storage backend cannot be reached. An `ApiError`, so any route that meets it answers 503
    `storage_unavailable`; a type of its own, so code that can do without the storage catches it."""

    def __init__(self) -> None:
        told = STORAGE_UNAVAILABLE.error(retry_after=RETRY_AFTER_SECONDS)
        super().__init__(told.status, told.code, told.message, headers=told.headers)


@dataclass(frozen=True)
class SessionRecord:
    """A signed-in browser session. `key` is a hash of the session id: the raw id is only in the cookie."""

    key: str
    user_id: str
    kind: str
    created_at: float
    last_seen: float
    expires_at: float  # the absolute end, however active the session is
    # OpenID Connect sign-ins only (proxy/auth/oidc.py); empty for every other kind.
    display_name: str = ""
    # Hashes of the IdP's session id and subject, which back-channel logout names: indexes, not secrets.
    idp_sid_hash: str = ""
    idp_sub_hash: str = ""
    idp_expires_at: float = 0.0  # when the IdP's access token expires (0: nothing to refresh)
    idp_tokens: str = ""  # the IdP's tokens as JSON, sealed (proxy/sealing.py)

    def indexes(self) -> list[str]:
        """The storage indexes besides the user's that list this session, for back-channel logout."""
        return [
            f"{name}:{value}"
            for name, value in (("oidc-sid", self.idp_sid_hash), ("oidc-sub", self.idp_sub_hash))
            if value
        ]


@dataclass(frozen=True)
class PendingEvent:
    """An outbox event as a claim hands it out: `attempts` counts this one."""

    event_id: str
    body: str
    attempts: int


@dataclass(frozen=True)
class Ranking:
    """Where a counter's increments are also added up: `member`'s total in the ranking `name` (a day's
    output per user: `Ranking("output:2026-12-07", user_id)`)."""

    name: str
    member: str


# Fields a backend writes beyond the first six, in this order; all strings but `idp_expires_at`.
OPTIONAL_FIELDS = ("display_name", "idp_sid_hash", "idp_sub_hash", "idp_expires_at", "idp_tokens")


class Storage(Protocol):
    # Sessions

    async def get_session(self, key: str) -> SessionRecord | None:
        """The record, or None when there is none or it is past `expires_at`."""

    async def save_session(self, record: SessionRecord) -> None:
        """Create or replace; the backend forgets the record at `expires_at`."""

    async def touch_session(self, key: str, last_seen: float) -> bool:
        """Set `last_seen` of an existing session; False (and nothing written) if it has ended.

        Unlike `save_session`, a touch racing a logout on another replica never brings the session back.
        """

    async def delete_session(self, key: str) -> None: ...

    async def delete_user_sessions(self, user_id: str) -> list[str]:
        """End every session of a user; returns the keys of the live sessions that were removed."""

    async def user_sessions(self, user_id: str) -> list[SessionRecord]:
        """The live sessions of a user, oldest first (for operators: `python -m proxy sessions list`)."""

    async def delete_indexed_sessions(self, index: str) -> list[tuple[str, str]]:
        """End every session listed in `index` (one of `SessionRecord.indexes()`); returns the
        (key, user id) of the live sessions that were removed."""

    async def update_idp_tokens(self, key: str, sealed: str, expires_at: float) -> bool:
        """Replace a session's IdP tokens; False (and nothing written) if the session has ended."""

    # Leases: a pool `name` of at most `limit` holders at a time

    async def acquire_lease(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        """Take one of the `limit` places in `name` for `ttl` seconds; False if all are held.

        Expired leases free their place first. A holder that already holds a place keeps it (and its
        ttl restarts), so retrying an acquire never takes two places.
        """

    async def renew_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Extend a held lease to `ttl` seconds from now; False if it had expired or was released."""

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def count_leases(self, name: str) -> int:
        """How many unexpired leases `name` has."""

    async def lease_holders(self, name: str) -> list[str]:
        """The holders of the unexpired leases of `name`, in no particular order."""

    # Counters

    async def incr(self, key: str, amount: int, ttl: float, ranking: Ranking | None = None) -> int:
        """Add `amount` and return the new value; a new counter is forgotten `ttl` seconds after
        its first increment (later increments do not extend it). With a `ranking`, `amount` is also
        added to the member's total there, in the same atomic step; a new ranking expires as a new
        counter does."""

    async def incr_up_to(
        self, key: str, amount: int, limit: int, ttl: float, ranking: Ranking | None = None
    ) -> int | None:
        """As `incr`, but only if the new value stays within `limit`; None (and nothing added, to the
        ranking either) if not."""

    async def get_counter(self, key: str) -> int:
        """The current value; 0 for a counter that does not exist or has expired."""

    async def top_ranked(self, name: str, count: int) -> list[tuple[str, int]]:
        """The `count` highest totals of the ranking `name` with their members, highest first (equal
        totals: members in reverse order, as Redis's ZREVRANGE gives them); [] when it has expired."""

    # Outbox

    async def add_event(self, event_id: str, body: str, limit: int, max_bytes: int) -> bool:
        """Queue an event, due now; False (and nothing added) when `limit` events are already pending,
        or their bodies would come to more than `max_bytes` (UTF-8) with this one. Adding an id already
        pending changes nothing."""

    async def claim_events(self, count: int, lease: float) -> list[PendingEvent]:
        """Up to `count` due events, oldest due first, each counted one attempt more and hidden from
        every other claim for `lease` seconds: due again then, unless retried or deleted before."""

    async def retry_event(self, event_id: str, delay: float) -> None:
        """Make a pending event due in `delay` seconds (nothing for one no longer pending)."""

    async def delete_event(self, event_id: str) -> None:
        """Forget an event: delivered, or given up on."""

    async def count_events(self) -> int:
        """How many events are pending, claimed ones included."""

    # Lifecycle

    async def ping(self) -> None:
        """Raise `StorageUnavailable` if the backend cannot be reached."""

    async def close(self) -> None: ...
