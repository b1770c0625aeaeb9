"""Reading request bodies: JSON only, never more than the configured number of bytes."""

from __future__ import annotations

import json

from starlette.requests import Request

from proxy.errors import ApiError, invalid_input


async def read_json(request: Request, max_bytes: int) -> object:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise invalid_input("Send the body as application/json.")
    too_large = ApiError(413, "body_too_large", f"The body is larger than {max_bytes} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        return json.loads(body)
    except ValueError:
        raise invalid_input("The body is not valid JSON.") from None
