"""`/api/chat/{alias}`: the route a Vercel AI SDK `useChat` points at (CONTRACT B3, C1; relay mode).

`?protocol=ui` (default) answers with the AI SDK 5+ UI message stream for `DefaultChatTransport`,
`?protocol=text` with plain text for `TextStreamChatTransport` (and v3/v4 `streamProtocol: "text"`),
`?protocol=data` with the AI SDK 3/4 data stream. Errors found before the stream starts are short
`text/plain` bodies, which useChat shows verbatim: every route here is a `TextErrorsRoute`
(proxy/errors.py).

The answer is a run (proxy/runs/) bound to the chat's id, so `useChat({ resume: true })` gets it
back after a reload, from any replica, and the chat's Stop button can end it with
`POST /api/chat/{alias}/{chatId}/stop`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from proxy.body import read_json
from proxy.chat import chat_inputs, parse_chat_request
from proxy.errors import INVALID_INPUT, TextErrorsRoute
from proxy.protocols import DataStreamEncoder, StreamEncoder, TextEncoder, UiMessageStreamEncoder
from proxy.runs import RunRequest, RunStream
from proxy.services import services
from proxy.storage import StorageUnavailable
from proxy.storage.runlog import RunMeta

ENCODERS: dict[str, Callable[[RunMeta], StreamEncoder]] = {
    "ui": lambda meta: UiMessageStreamEncoder(meta.message_id),
    "text": lambda meta: TextEncoder(),
    "data": lambda meta: DataStreamEncoder(),
}
NO_STORE = {"Cache-Control": "no-store"}


def _protocol(request: Request, default: str = "ui") -> str:
    protocol = request.query_params.get("protocol", default)
    if protocol not in ENCODERS:
        raise INVALID_INPUT.error("protocol must be ui, text or data.")
    return protocol


async def _chat_request(request: Request) -> RunRequest:
    """The workflow the path names (404), the protocol asked for and the chat's prompt (400)."""
    bff = services(request)
    workflow = bff.workflows.get(request.path_params["alias"])
    protocol = _protocol(request)
    prompt = parse_chat_request(await read_json(request), accepts_images=workflow.image_input is not None)
    inputs = chat_inputs(prompt, workflow, bff.settings.max_input_chars)
    return RunRequest(workflow, inputs, f"chat:{workflow.alias}:{protocol}", chat_id=prompt.chat_id)


async def chat(request: Request) -> Response:
    bff = services(request)
    # The user's limits are checked last, so a request refused for bad input costs nothing against them.
    run = await bff.runs.open(request, lambda: _chat_request(request))
    encoder = ENCODERS[_protocol(request)](run.meta)
    return RunStream(bff.runs, run.meta, encoder, headers=run.headers, what=run.request.what)


async def _resume(request: Request, chat_id: str, protocol: str, nothing: Response) -> Response:
    """The chat's run replayed in `protocol` if the signed-in user owns it; `nothing` for every other
    case alike (no session, no such workflow or run, someone else's chat, storage down: a page load
    must not start in error), and for a run that failed before it said anything."""
    bff = services(request)
    alias = request.path_params["alias"]
    session = await bff.sessions.current(request, touch=False)
    if session is None or alias not in bff.workflows.aliases():
        return nothing
    try:
        meta = await bff.runs.chat_run(session, alias, chat_id)
    except StorageUnavailable:
        return nothing
    if meta is None:
        return nothing
    encoder = ENCODERS[protocol](meta)
    return RunStream(bff.runs, meta, encoder, instead_of_error=nothing, what=f"resume:{alias}:{protocol}")


async def resume(request: Request) -> Response:
    """useChat `resume: true` asks here on every page load: the chat's run replayed from its first
    chunk (same message id, so the client replaces its partial message), then live. 204 when there is
    none: the one answer that reveals nothing and keeps the chat out of its error state."""
    nothing = Response(status_code=204, headers=NO_STORE)
    return await _resume(request, request.path_params["chat_id"], _protocol(request), nothing)


async def resume_v4(request: Request) -> Response:
    """AI SDK 4's `experimental_resume()` (`GET {api}?chatId=...`) in the data protocol; with no run, an
    empty data stream, because that client takes a 204 for an error."""
    empty = DataStreamEncoder()
    nothing = Response(b"", headers={**empty.headers, **NO_STORE}, media_type=empty.media_type)
    protocol = _protocol(request, default="data")
    return await _resume(request, request.query_params.get("chatId", ""), protocol, nothing)


async def stop(request: Request) -> Response:
    """The chat's Stop button: ends the chat's run on whichever replica holds it. 204 either way."""
    bff = services(request)
    session = await bff.sessions.require(request)
    meta = await bff.runs.chat_run(session, request.path_params["alias"], request.path_params["chat_id"])
    if meta is not None:
        await bff.runs.stop(meta.run_id)
    return Response(status_code=204, headers=NO_STORE)


def chat_routes(modes: Sequence[str]) -> list[TextErrorsRoute]:
    if "relay" not in modes:
        return []
    return [
        TextErrorsRoute("/api/chat/{alias}", chat, methods=["POST"]),
        TextErrorsRoute("/api/chat/{alias}", resume_v4, methods=["GET"]),
        TextErrorsRoute("/api/chat/{alias}/{chat_id}/stream", resume, methods=["GET"]),
        TextErrorsRoute("/api/chat/{alias}/{chat_id}/stop", stop, methods=["POST"]),
    ]
