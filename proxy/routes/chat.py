"""`/api/chat/{alias}`: the route a Vercel AI SDK `useChat` points at (CONTRACT B3, relay mode).

`?protocol=ui` (default) answers with the AI SDK 5+ UI message stream for `DefaultChatTransport`,
`?protocol=text` with plain text for `TextStreamChatTransport` (and v3/v4 `streamProtocol: "text"`),
`?protocol=data` with the AI SDK 3/4 data stream. Errors found before the stream starts are short
`text/plain` bodies, which useChat shows verbatim (proxy/errors.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admission import relay_response
from proxy.body import read_json
from proxy.chat import chat_inputs, parse_chat_request
from proxy.errors import invalid_input
from proxy.protocols import DataStreamEncoder, StreamEncoder, TextEncoder, UiMessageStreamEncoder
from proxy.services import services

ENCODERS: dict[str, Callable[[], StreamEncoder]] = {
    "ui": UiMessageStreamEncoder,
    "text": TextEncoder,
    "data": DataStreamEncoder,
}


async def chat(request: Request) -> Response:
    bff = services(request)
    session = await bff.sessions.require(request)
    workflow = bff.workflows.get(request.path_params["alias"])
    protocol = request.query_params.get("protocol", "ui")
    if protocol not in ENCODERS:
        raise invalid_input("protocol must be ui, text or data.")
    body = await read_json(request)
    chat = parse_chat_request(body, accepts_images=workflow.image_input is not None)
    inputs = chat_inputs(chat, workflow, bff.settings.max_input_chars)
    # The user's limits are checked last, so a request refused for bad input costs nothing against them.
    return await relay_response(
        bff, session, workflow, inputs, f"chat:{workflow.alias}:{protocol}", ENCODERS[protocol]()
    )


async def resume(request: Request) -> Response:
    """useChat `resume: true` asks here on every page load. Streams are not kept for resuming, and a
    204 is the one answer that says so without putting the chat into its error state. No session is
    needed: the answer reveals nothing, and a page loaded before sign-in must not start in error."""
    return Response(status_code=204, headers={"Cache-Control": "no-store"})


def chat_routes(modes: Sequence[str]) -> list[Route]:
    if "relay" not in modes:
        return []
    return [
        Route("/api/chat/{alias}", chat, methods=["POST"]),
        Route("/api/chat/{alias}/{chat_id}/stream", resume, methods=["GET"]),
    ]
