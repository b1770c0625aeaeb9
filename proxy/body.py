"""Reading request bodies: JSON text only (the size cap lives in proxy/middleware/body_policy.py)."""

from __future__ import annotations

import json
import re

from starlette.requests import ClientDisconnect, Request

from proxy.context import request_context
from proxy.errors import INVALID_INPUT, ClientGone

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads_text(data: bytes | bytearray) -> object:
    """`json.loads` of UTF-8 JSON text, refusing (ValueError) whatever would fail later as a server
    error: bytes that are not strict UTF-8, an unpaired surrogate escape ("\\ud800") and nesting too
    deep to parse.

    JSON allows surrogate escapes, but unpaired they are no characters: the string cannot be encoded
    as UTF-8, so the moment it is sent on (upstream, to a hash, in a response) it would fail. For the
    same reason the bytes are decoded strictly: `json.loads(bytes)` lets encoded surrogates through.
    """
    try:
        value = json.loads(data.decode("utf-8"))
        if SURROGATE_ESCAPE.search(data):  # rare: only then pay for the full check
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("unpaired surrogate") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return value


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
