"""What one request did, written by the code that knows it and read by whoever reports it.

The request id middleware writes the request id; the session layer the user hash; the door to the
upstream the upstream's status; a relay how it ended, how many characters it sent and when its first
upstream byte went out. The access log turns it into the request's summary line and the log formatter
puts the request id on every line. Nothing here imports a middleware, and no middleware needs
another to have run first: the outermost one that serves the request makes the context, the others
join it (`ServingRequest`).

The context lives in a contextvar, so every task the request starts (a run, with its upstream calls)
writes into the same object. Outside a request, `request_context()` returns a throwaway that nobody
reads, so code that also runs outside requests (a run's background work, the CLI) need not check.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

_current: ContextVar[RequestContext | None] = ContextVar("request_context", default=None)


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str | None = None
    user_hash: str | None = None
    # The last upstream call of the request: its status, or why there was none (connect, timeout, ...).
    upstream_status: int | None = None
    upstream_error: str | None = None
    # A relay: what it relayed ("stream:tutor", "chat:tutor:ui", "resume:...", ...), its run, and how much.
    relay: str | None = None
    run_id: str | None = None
    chars: int | None = None
    first_byte_at: float | None = None  # time.monotonic() of the first upstream byte the client got
    # How the request ended when the code that knows says so ("client_gone", "refused:csrf_failed", ...).
    end: str | None = None
    trace_id: str | None = None  # the request's trace, when tracing is on: log line to trace

    def upstream_answered(self, status: int | None, error: str | None = None) -> None:
        self.upstream_status, self.upstream_error = status, error

    def relayed(self, what: str, run_id: str, *, end: str, chars: int, first_byte_at: float | None = None) -> None:
        self.relay, self.run_id, self.end, self.chars, self.first_byte_at = what, run_id, end, chars, first_byte_at


def request_context() -> RequestContext:
    """The context of the request being served; outside a request, a new one that nobody reads."""
    found = _current.get()
    return found if found is not None else RequestContext()


def in_request() -> bool:
    """Whether a request is being served (in this task, or one it started)."""
    return _current.get() is not None


class ServingRequest:
    """`with ServingRequest() as context:` the request's context for the length of the block: the one
    an outer middleware made, or a new one, current until the block ends.

    A class rather than a `@contextmanager` generator: it stays alive as long as the request, which
    for a stream is minutes, and a generator with its wrapper weighs some 700 bytes per open stream."""

    __slots__ = ("_token",)

    def __enter__(self) -> RequestContext:
        found = _current.get()
        if found is not None:
            self._token: Token[RequestContext | None] | None = None
            return found
        context = RequestContext()
        self._token = _current.set(context)
        return context

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
