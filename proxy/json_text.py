"""JSON text as every boundary reads it: request bodies (proxy/body.py) and upstream answers
(proxy/upstream/client.py)."""

from __future__ import annotations

import json
import re

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
