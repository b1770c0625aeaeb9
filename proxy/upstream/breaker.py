"""The circuit breaker in front of the upstream: stop calling an upstream that is down."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.errors import UPSTREAM_UNAVAILABLE, ApiError

logger = logging.getLogger("proxy.upstream")

BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_SECONDS = 10.0


class CircuitBreaker:
    """Stops hammering an upstream that is down.

    After `threshold` consecutive failures (connection errors, timeouts, 502-504) every call fails at once
    with a 503 for `cooldown` seconds, instead of piling up connections that hang. Then a single probe
    call is let through: success closes the circuit, failure opens it for another cooldown.
    """

    def __init__(self, threshold: int = BREAKER_THRESHOLD, cooldown: float = BREAKER_COOLDOWN_SECONDS) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def refusal(self) -> ApiError | None:
        """The 503 a call gets now, without being made, while the circuit is open; None when it may go."""
        if self._opened_at is None:
            return None
        remaining = self._opened_at + self.cooldown - time.monotonic()
        if remaining > 0 or self._probing:
            return UPSTREAM_UNAVAILABLE.error(retry_after=max(1, math.ceil(remaining)))
        return None

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Wrap one upstream call, which reports `success()` or `failure()`."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        if self._opened_at is not None:
            self._probing = True
        try:
            yield
        finally:
            # A probe that was cancelled decided nothing: the next call may probe again.
            self._probing = False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.threshold:
            if self._opened_at is None:
                logger.warning("upstream circuit opened after %s consecutive failures", self._failures)
            self._opened_at = time.monotonic()
