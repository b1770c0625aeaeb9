"""Reading request bodies: JSON text only (the size cap lives in proxy/middleware/body_policy.py)."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from proxy.context import request_context
from proxy.errors import INVALID_INPUT, ClientGone
from proxy.json_text import loads_text


async def read_json(request: Request) -> object:
    """The request's JSON body. The size cap is not checked here: BodyPolicyMiddleware enforces it
    for every route that reads a body, on the declared length and on the bytes as they arrive."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise INVALID_INPUT.error("Send the body as application/json.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
    except ClientDisconnect:
        # The client left mid-upload: nobody to answer, and no server error either.
        request_context().end = "client_gone_early"
        raise ClientGone from None
    try:
        return loads_text(body)
    except ValueError:
        raise INVALID_INPUT.error("The body is not valid JSON text.") from None
