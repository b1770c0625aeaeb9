"""An open upstream answer, read chunk by chunk as it arrives (an `UpstreamBody`)."""

from __future__ import annotations

from proxy.upstream import UpstreamCut
from proxy.upstream.errors import TRANSPORT_ERRORS, transport_words
from proxy.upstream.http1 import Answer


class StreamedBody:
    """The body of an answer, for the minutes a stream runs; the reader closes it."""

    def __init__(self, response: Answer) -> None:
        self._response = response

    async def read_chunk(self) -> bytes:
        # Whatever bytes have arrived, as they arrive: never waits to fill a buffer. The bytes that
        # arrived ahead of a broken connection come first: they are the answer's last words.
        try:
            return await self._response.read_chunk()
        except TRANSPORT_ERRORS as exc:
            raise UpstreamCut(transport_words(exc)) from None

    async def aclose(self) -> None:
        let_go(self._response)


def let_go(response: Answer) -> None:
    """Done with an answer: one read to the end leaves a reusable connection; one abandoned midway
    (client gone, deadline, a cap) must be closed, or the next request would read the rest of it."""
    if response.at_eof():
        response.release()
    else:
        response.close()
