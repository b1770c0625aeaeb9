"""Graceful shutdown. uvicorn stops accepting on SIGTERM and waits for open connections, but it never
tells a running stream to stop (Kludex/uvicorn#2913), and a stream cut by the final kill looks, to a
client, like an answer that simply ended. So on SIGTERM `/readyz` turns 503 at once (the balancer
stops sending traffic), running relays get `BFF_DRAIN_SECONDS` to finish, and those still running
then are ended with an in-band error (or, for plain text, a dropped connection) before uvicorn's own
graceful-shutdown timeout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

logger = logging.getLogger("proxy.drain")


class Drain:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_all: Callable[[str], int] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, stop_all: Callable[[str], int]) -> None:
        """Called from the lifespan, once the loop runs and the stream registry exists."""
        self._loop = loop
        self._stop_all = stop_all

    def begin(self) -> None:
        """Start draining. Safe to call from a signal handler: the work is handed to the event loop."""
        if self.active or self._loop is None:
            return
        self.active = True
        # A fresh context: the signal may interrupt a request, whose id must not label the drain's lines.
        self._loop.call_soon_threadsafe(self._schedule, context=contextvars.Context())

    def _schedule(self) -> None:
        assert self._loop is not None
        logger.info("draining", extra={"drain_seconds": self.seconds})
        self._loop.call_later(self.seconds, self._deadline)

    def _deadline(self) -> None:
        if self._stop_all is not None:
            stopped = self._stop_all("shutdown")
            logger.info("drain deadline passed", extra={"relays_ended": stopped})
