"""The AI SDK 5+ UI message stream (what `DefaultChatTransport` parses): SSE events of JSON chunks.

Only chunk types and fields that every 5.x, 6.x and 7.x client accepts are sent. Clients before ai
5.0.217 reject unknown fields on known chunk types, and before 5.0.92 even `finishReason` on `finish`,
so `finish` carries nothing. See shared/reference/ai-sdk-protocol.md.
"""

from __future__ import annotations

import codecs
import json
import secrets

TEXT_ID = "text-0"


def event(chunk: dict[str, str]) -> bytes:
    # One event per chunk, closed by a blank line: an event without it is discarded by the client.
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class UiMessageStreamEncoder:
    def __init__(self, message_id: str | None = None) -> None:
        self.media_type = "text/event-stream"
        self.headers = {"Connection": "keep-alive", "x-vercel-ai-ui-message-stream": "v1"}
        self.keepalive: bytes | None = b": keep-alive\n\n"
        # One per run (`RunMeta.message_id`), fresh for every answer: the client updates the last
        # message carrying this id, so a resumed answer replaces its partial message, and a reused
        # id would overwrite the previous answer instead of adding a new one.
        self.message_id = message_id or "msg_" + secrets.token_hex(12)
        # Upstream chunks may split a UTF-8 character; JSON needs whole characters.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def open(self) -> bytes:
        return (
            event({"type": "start", "messageId": self.message_id})
            + event({"type": "start-step"})
            + event({"type": "text-start", "id": TEXT_ID})
        )

    def chunk(self, data: bytes) -> bytes:
        return self._delta(self._decoder.decode(data))

    def close(self) -> bytes:
        return (
            self._delta(self._decoder.decode(b"", final=True))
            + event({"type": "text-end", "id": TEXT_ID})
            + event({"type": "finish-step"})
            + event({"type": "finish"})
            + b"data: [DONE]\n\n"
        )

    def fail(self, message: str) -> bytes | None:
        # The client throws on `error`, keeps the partial text and shows `errorText` as chat.error.
        return event({"type": "error", "errorText": message}) + b"data: [DONE]\n\n"

    @staticmethod
    def _delta(text: str) -> bytes:
        return event({"type": "text-delta", "id": TEXT_ID, "delta": text}) if text else b""
