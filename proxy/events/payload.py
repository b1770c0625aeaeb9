"""The `run.ended` event: who ran which workflow in which chat, how the run ended, how much it wrote
and how long it took, and, when `BFF_EVENTS_INCLUDE_TEXT` is on, the text itself (docs/events.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

EVENT_TYPE = "run.ended"


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RunEnded:
    run_id: str
    user_id: str
    workflow: str  # the alias the client used
    chat_id: str | None
    end: str  # proxy/runs/ending.py's reasons
    chars: int
    started_at: float  # wall clock
    first_byte_ms: float | None
    duration_ms: float
    text: str | None  # None unless BFF_EVENTS_INCLUDE_TEXT

    @property
    def size(self) -> int:
        """About what the event weighs, in bytes, for the bounds on what waits: its text, at most
        three bytes a character in UTF-8 (and JSON escapes the rest), and the fields around it."""
        return 3 * len(self.text or "") + 1024

    @property
    def event_id(self) -> str:
        """One event per run, so its id follows from the run's: a receiver can match it to the
        `X-Run-Id` its client saw."""
        return "evt_" + self.run_id.removeprefix("run_")

    def body(self, now: float) -> str:
        data: dict[str, object] = {
            "user_id": self.user_id,
            "workflow": self.workflow,
            "chat_id": self.chat_id,
            "run_id": self.run_id,
            "end": self.end,
            "chars": self.chars,
            "timings": {
                "started_at": iso_time(self.started_at),
                "first_byte_ms": self.first_byte_ms,
                "duration_ms": self.duration_ms,
            },
        }
        if self.text is not None:
            data["text"] = self.text
        # UTF-8 as it is, not \u escapes: an answer in Chinese would otherwise weigh twice as much.
        event = {"type": EVENT_TYPE, "timestamp": iso_time(now), "data": data}
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
