"""How a run ended, and what each follower is told: the one place that maps a stop reason to a status
(before the answer started) or an in-band message (after).

Reasons: `complete`; `stopped` (the stop route) and `replaced` (a new message in the same chat), which
end the answer cleanly where it is; `client_gone` / `client_gone_early` (nobody was left to read it,
after or before its first byte); `revoked` (its session ended); `shutdown`; `deadline`
(`BFF_MAX_STREAM_SECONDS`); `upstream_cut`; `too_large` (the log's byte cap); `budget`; `lost` (the
replica running it died); `failed` (a bug); and `refused:<code>` for an upstream or admission error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from proxy.budget import spent
from proxy.errors import (
    ANSWER_TOO_LARGE,
    BUDGET_EXHAUSTED,
    SHUTTING_DOWN,
    UNAUTHENTICATED,
    UNKNOWN_RUN,
    UPSTREAM_ERROR,
    UPSTREAM_TIMEOUT,
    ApiError,
    rebuilt,
)
from proxy.storage.runlog import END, Entry

INTERRUPTED = "The answer was interrupted. Please try again."
TOO_LONG = "The answer took too long and was stopped."
TOO_LARGE = "The answer was too long and was stopped."
FAILED = "An error occurred."
SESSION_ENDED = "The session ended."
RESTARTING = SHUTTING_DOWN.message
BUDGET_SPENT = BUDGET_EXHAUSTED.message
CLEAN = frozenset({"complete", "stopped", "replaced"})
NOBODY_LEFT = frozenset({"client_gone", "client_gone_early"})
# How long a client is asked to wait when the replica running its answer shuts down.
RESTART_RETRY_SECONDS = 5


def _upstream_failed() -> ApiError:
    return UPSTREAM_ERROR.error(FAILED)


def _never_began() -> ApiError:
    # Only a resume hears this: the run stopped before its first word because nobody followed it,
    # so there is nothing to replay (the upstream did not fail: no upstream_error).
    return UNKNOWN_RUN.error("That answer stopped before it began: nobody was following it.")


# reason -> (the error before the answer started, the message in-band after it)
_ENDINGS: dict[str, tuple[Callable[[], ApiError], str]] = {
    # The follower that started the run left, so nobody hears these but a follower that came back
    # later (a resume), to a run that stopped because nobody followed it.
    "client_gone": (_never_began, INTERRUPTED),
    "client_gone_early": (_never_began, INTERRUPTED),
    "revoked": (UNAUTHENTICATED.error, SESSION_ENDED),
    "shutdown": (lambda: SHUTTING_DOWN.error(retry_after=RESTART_RETRY_SECONDS), RESTARTING),
    "deadline": (lambda: UPSTREAM_TIMEOUT.error(TOO_LONG), TOO_LONG),
    "upstream_cut": (_upstream_failed, INTERRUPTED),
    "too_large": (lambda: ANSWER_TOO_LARGE.error(TOO_LARGE), TOO_LARGE),
    "budget": (spent, BUDGET_SPENT),
    "lost": (_upstream_failed, INTERRUPTED),
    "failed": (_upstream_failed, FAILED),
}
# Every reason but `refused:<code>`, for the metrics to scrape from the start.
REASONS = (*sorted(CLEAN), *_ENDINGS)


@dataclass(frozen=True)
class Ending:
    reason: str
    error: ApiError | None = None  # None: a clean end
    inband: str = ""  # what a started stream says instead of the error

    @property
    def nobody_left(self) -> bool:
        """The run ended because its client left: the request that started it answers nothing."""
        return self.reason in NOBODY_LEFT

    @classmethod
    def of(cls, reason: str) -> Ending:
        if reason in CLEAN:
            return cls(reason)
        error, inband = _ENDINGS.get(reason, _ENDINGS["failed"])
        return cls(reason, error(), inband)

    @classmethod
    def refused(cls, error: ApiError) -> Ending:
        # Kept without where it was raised: its traceback (and its cause's) holds the frames that
        # raised it, and through them the run that keeps this ending, a cycle for the collector.
        error = error.with_traceback(None)
        error.__cause__ = error.__context__ = None
        return cls(f"refused:{error.code}", error, error.message)

    def entry(self) -> Entry:
        """The log's `END` entry, readable on any replica (`from_entry`)."""
        fields: dict[str, object] = {"reason": self.reason}
        if self.error is not None and self.reason.startswith("refused:"):
            error = self.error
            # The status too: a replica still on the previous version, mid-upgrade, reads it.
            fields.update(status=error.status, code=error.code, message=error.message, headers=error.headers)
        return (END, json.dumps(fields).encode())

    @classmethod
    def from_entry(cls, value: bytes) -> Ending:
        try:
            fields = json.loads(value)
            reason = str(fields["reason"])
            if not reason.startswith("refused:"):
                return cls.of(reason)
            headers = {str(k): str(v) for k, v in dict(fields.get("headers") or {}).items()}
            error = rebuilt(str(fields["code"]), str(fields["message"]), headers)
        except (KeyError, TypeError, ValueError):  # not written by us, or a code this version does not know
            return cls.of("lost")
        return cls.refused(error)
