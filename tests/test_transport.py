"""`open_body` reads any httpx response, not only one from our aiohttp transport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.transport import open_body


class Chunks(httpx.AsyncByteStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_a_response_from_another_transport_is_read_chunk_by_chunk_and_closed() -> None:
    stream = Chunks(b"Owls ", b"hunt at ", b"night.")
    body = open_body(httpx.Response(200, stream=stream))

    assert [await body.read_chunk() for _ in range(4)] == [b"Owls ", b"hunt at ", b"night.", b""]
    await body.aclose()
    assert stream.closed
