"""Plain text: the upstream bytes as they arrive, untouched."""

from __future__ import annotations


class TextEncoder:
    def __init__(self) -> None:
        self.media_type = "text/plain; charset=utf-8"
        self.headers: dict[str, str] = {}
        self.keepalive: bytes | None = None

    def open(self) -> bytes:
        return b""

    def chunk(self, data: bytes) -> bytes:
        return data

    def close(self) -> bytes:
        return b""

    def fail(self, message: str) -> bytes | None:
        return None  # plain text cannot carry an error: the relay drops the connection instead
