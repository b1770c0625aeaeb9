"""The AI SDK 3/4 data stream (`streamProtocol: "data"`, the v4 default): one `CODE:JSON` line per part.

Only the parts every 3.x/4.x client knows are sent: `0:` text, `3:` error and `d:` finish. `d:`
carries no `usage`, because the relay does not know token counts and made-up numbers would be
worse than none.
"""

from __future__ import annotations

import codecs
import json


def part(code: str, value: object) -> bytes:
    return f"{code}:{json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n".encode()


class DataStreamEncoder:
    def __init__(self) -> None:
        self.media_type = "text/plain; charset=utf-8"
        self.headers = {"x-vercel-ai-data-stream": "v1"}
        # The client skips empty lines, so a bare newline keeps the line busy without meaning anything.
        self.keepalive: bytes | None = b"\n"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def open(self) -> bytes:
        return b""

    def chunk(self, data: bytes) -> bytes:
        return self._text(self._decoder.decode(data))

    def close(self) -> bytes:
        return self._text(self._decoder.decode(b"", final=True)) + part("d", {"finishReason": "stop"})

    def fail(self, message: str) -> bytes | None:
        return part("3", message)  # the client throws Error(message) and keeps the partial text

    @staticmethod
    def _text(text: str) -> bytes:
        return part("0", text) if text else b""
