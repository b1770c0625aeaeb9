"""An in-process `Upstream` (proxy/upstream/__init__.py) for unit tests: answers the test scripts, no
sockets. Streams and runs answer in the order they were queued; mints always succeed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio

from proxy.errors import ApiError
from proxy.upstream import MintedToken, RunResult, UpstreamCut


class FakeBody:
    """A streamed answer: `chunks`, one per read, then the end, or a cut (`cut=True`). With
    `held=True` it waits after its chunks until the test calls `release()`: a model still thinking."""

    def __init__(self, *chunks: bytes, cut: bool = False, held: bool = False) -> None:
        self._chunks = list(chunks)
        self._cut = cut
        self._released = anyio.Event()
        if not held:
            self._released.set()
        self.read_all = anyio.Event()  # every chunk was handed out
        self.closed = False

    def release(self) -> None:
        self._released.set()

    async def read_chunk(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        self.read_all.set()
        await self._released.wait()
        if self._cut:
            raise UpstreamCut("connection lost")
        return b""

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class StreamCall:
    workflow_id: str
    token: str
    inputs: dict[str, str]
    request_id: str | None


@dataclass
class FakeUpstream:
    streams: list[FakeBody | ApiError] = field(default_factory=list)  # what the next streams answer
    runs: list[RunResult | ApiError] = field(default_factory=list)  # what the next runs answer
    stream_calls: list[StreamCall] = field(default_factory=list)
    minted: int = 0
    closed: bool = False

    async def mint_token(self, ttl: int, *, request_id: str | None = None) -> MintedToken:
        self.minted += 1
        return MintedToken(token=f"pub_tok_{self.minted}", ttl=ttl, expires_at=time.time() + ttl)

    def stream_url(self, workflow_id: str, token: str) -> str:
        return f"http://upstream.test/api/v1/run/{workflow_id}/stream?token={token}"

    async def open_stream(
        self, workflow_id: str, token: str, inputs: dict[str, str], *, request_id: str | None = None
    ) -> FakeBody:
        self.stream_calls.append(StreamCall(workflow_id, token, inputs, request_id))
        answer = self.streams.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    async def run(
        self, workflow_id: str, inputs: dict[str, str], *, max_bytes: int, request_id: str | None = None
    ) -> RunResult:
        answer = self.runs.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    async def aclose(self) -> None:
        self.closed = True
