"""JSON-lines logging for the whole process (ours and uvicorn's), with secrets scrubbed.

Nothing should ever log a secret; the scrubber is the second line of defence, not the first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import TextIO

from proxy.context import in_request, request_context

TOKEN_PATTERN = re.compile(r"pub_tok_[A-Za-z0-9_\-]+")
PIPE_BUF = 4096  # Linux's: the largest write to a pipe that is atomic
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which worker, with `serve --workers N`
        }
        request_id = request_context().request_id
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.scrub(json.dumps(entry, default=str, ensure_ascii=False))

    def scrub(self, line: str) -> str:
        for secret in self._secrets:
            line = line.replace(secret, "[redacted]")
        return TOKEN_PATTERN.sub("pub_tok_[redacted]", line)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines requests log within one event-loop iteration together,
    at its end: one write for a burst of requests' lines, not a write (a system call) per line. Any
    other line (start-up, shutdown, the CLI, another thread) goes out at once, after those held, so the
    order stays, and the last lines of a process that ends by re-raising its signal are not lost."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        loop = _running_loop() if in_request() else None
        if loop is not None and not self._held:
            loop.call_soon(self.flush)
        self._held.append(line)
        if loop is None:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._held:
                lines, self._held = self._held, []
                try:
                    for piece in _atomic_pieces(lines):
                        self.stream.write(piece)
                except Exception:  # a closed or broken stream: what logging itself does is say so
                    self.handleError(logging.makeLogRecord({"msg": lines[0]}))
            super().flush()
        finally:
            self.release()


def _atomic_pieces(lines: list[str]) -> list[str]:
    """The lines, newline-ended, in writes of at most `PIPE_BUF` bytes each (a longer line alone): one
    write of up to that many bytes to a pipe is never interleaved with another process's, so the
    workers of `serve --workers N` sharing one stderr never splice each other's lines."""
    pieces: list[str] = []
    piece: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode())) + 1
        if piece and size + length > PIPE_BUF:
            pieces.append("".join(piece))
            piece, size = [], 0
        piece.append(line + "\n")
        size += length
    pieces.append("".join(piece))
    return pieces


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def configure_logging(secrets: list[str], level: str = "INFO") -> None:
    # Fields no line of ours shows: not looking them up saves a walk of the stack per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx (the JWKS fetch, the tests' clients) logs every request URL at INFO; a URL may carry a token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
