"""An open upstream answer, read chunk by chunk as it arrives (an `UpstreamBody`)."""

from __future__ import annotations

import aiohttp

from proxy.upstream import UpstreamCut
from proxy.upstream.errors import TRANSPORT_ERRORS, transport_words


class StreamedBody:
    """The body of an aiohttp response, for the minutes a stream runs; the reader closes it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._failure: UpstreamCut | None = None

    async def read_chunk(self) -> bytes:
        # Whatever bytes have arrived, as they arrive: never waits to fill a buffer.
        if self._failure is not None:
            raise self._failure
        content = self._response.content
        try:
            return await content.readany()
        except TRANSPORT_ERRORS as exc:
            failure = UpstreamCut(transport_words(exc))
            # aiohttp raises a connection's error before handing over the bytes that arrived just
            # ahead of it (its public `read_nowait` raises it too); they are the answer's last words
            # and belong to the client.
            leftover = content._read_nowait(-1)
            if not leftover:
                raise failure from None
            self._failure = failure
            return leftover

    async def aclose(self) -> None:
        let_go(self._response)


def let_go(response: aiohttp.ClientResponse) -> None:
    """Done with an answer: one read to the end leaves a reusable connection; one abandoned midway
    (client gone, deadline, a cap) must be closed, or the next request would read the rest of it."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()
