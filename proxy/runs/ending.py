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

from proxy.errors import ApiError, client_gone, shutting_down, unauthenticated
from proxy.storage.runlog import END, Entry

INTERRUPTED = "The answer was interrupted. Please try again."
TOO_LONG = "The answer took too long and was stopped."
TOO_LARGE = "The answer was too long and was stopped."
FAILED = "An error occurred."
SESSION_ENDED = "The session ended."
RESTARTING = "The service is restarting. Please try again."
BUDGET_SPENT = "Today's answer budget is used up; it renews at midnight UTC."
CLEAN = frozenset({"complete", "stopped", "replaced"})


def _upstream_failed() -> ApiError:
    return ApiError(502, "upstream_error", FAILED)


# reason -> (the error before the answer started, the message in-band after it)
_ENDINGS: dict[str, tuple[Callable[[], ApiError], str]] = {
    "client_gone": (client_gone, INTERRUPTED),
    "client_gone_early": (client_gone, INTERRUPTED),
    "revoked": (unauthenticated, SESSION_ENDED),
    "shutdown": (shutting_down, RESTARTING),
    "deadline": (lambda: ApiError(504, "upstream_timeout", TOO_LONG), TOO_LONG),
    "upstream_cut": (_upstream_failed, INTERRUPTED),
    "too_large": (lambda: ApiError(502, "answer_too_large", TOO_LARGE), TOO_LARGE),
    "budget": (lambda: ApiError(429, "budget_exhausted", BUDGET_SPENT), BUDGET_SPENT),
    "lost": (_upstream_failed, INTERRUPTED),
    "failed": (_upstream_failed, FAILED),
}


@dataclass(frozen=True)
class Ending:
    reason: str
    error: ApiError | None = None  # None: a clean end
    inband: str = ""  # what a started stream says instead of the error

    @classmethod
    def of(cls, reason: str) -> Ending:
        if reason in CLEAN:
            return cls(reason)
        error, inband = _ENDINGS.get(reason, _ENDINGS["failed"])
        return cls(reason, error(), inband)

    @classmethod
    def refused(cls, error: ApiError) -> Ending:
        return cls(f"refused:{error.code}", error, error.message)

    def entry(self) -> Entry:
        """The log's `END` entry, readable on any replica (`from_entry`)."""
        fields: dict[str, object] = {"reason": self.reason}
        if self.error is not None and self.reason.startswith("refused:"):
            error = self.error
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
            error = ApiError(int(fields["status"]), str(fields["code"]), str(fields["message"]), headers=headers)
        except (KeyError, TypeError, ValueError):
            return cls.of("lost")
        return cls.refused(error)
