"""The shape every stream encoder has; the relay knows nothing else about a protocol."""

from __future__ import annotations

from typing import Protocol


class StreamEncoder(Protocol):
    media_type: str
    headers: dict[str, str]
    # Sent while the upstream has not produced its first byte, so idle proxies keep the line open.
    # None: the protocol has no way to send bytes that mean nothing.
    keepalive: bytes | None

    def open(self) -> bytes:
        """Bytes that start the body, sent with the first upstream chunk."""

    def chunk(self, data: bytes) -> bytes:
        """One upstream chunk, framed."""

    def close(self) -> bytes:
        """Bytes that end a successful body."""

    def fail(self, message: str) -> bytes | None:
        """Bytes that end the body with an in-band error, or None when the protocol cannot say so
        and the connection must be dropped instead, so the client never mistakes it for success."""
