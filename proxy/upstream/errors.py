"""What an upstream failure becomes: the CONTRACT B6 status and code a browser sees.

The messages are ours and generic, never the upstream's text (which goes to the server log only, see
`upstream_error_detail`), and never contain the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from proxy.errors import (
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_ERROR,
    UPSTREAM_OUT_OF_CREDITS,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_TIMEOUT,
    WORKFLOW_NOT_FOUND,
    ApiError,
)

logger = logging.getLogger("proxy.upstream")

DEFAULT_RETRY_AFTER = "5"
UNREACHABLE = "The upstream service could not be reached."
# An answer that is not the shape CONTRACT A1-A3 give it.
UNEXPECTED = "The upstream service sent an unexpected answer."
RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,9}")
MAX_RETRY_AFTER_SECONDS = 3600
# What the client (http1.py) raises when the upstream cannot be reached or breaks off: an `OSError`
# (refused, reset, unresolvable, TLS, closed early, malformed: `ConnectionError`s), or a `TimeoutError`.
TRANSPORT_ERRORS = (OSError, TimeoutError)
URL_QUERY = re.compile(r"\?[^\s'\"]*")


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer in time: the client's words, without a URL's
    query, and the name of its exception (`source`), for the log and `python -m proxy check`."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(transport_words(exc))
        self.source = type(exc).__name__


class UpstreamConnectError(UpstreamFailure, ConnectionError):
    """The upstream could not be reached, or the connection broke before its answer was read."""


class UpstreamTimeout(UpstreamFailure, TimeoutError):
    """The upstream did not connect, or answer, in time."""


def transport_words(exc: BaseException) -> str:
    """What the client says of a failure. Words may name a URL, and a stream URL carries a stream token
    that was not spent yet: the query is cut off."""
    return URL_QUERY.sub("", str(exc)) or type(exc).__name__


def transport_failure(exc: BaseException) -> UpstreamConnectError | UpstreamTimeout:
    """The client's exception as one of ours. Which of the two it is decides the status the browser
    sees: a refused connection is a 502, a timeout a 504. The client's own exception is not chained."""
    return UpstreamTimeout(exc) if isinstance(exc, TimeoutError) else UpstreamConnectError(exc)


def transport_error(failure: UpstreamFailure, operation: str) -> ApiError:
    logger.warning("upstream %s failed: %s", operation, failure.source)
    if isinstance(failure, UpstreamTimeout):
        return UPSTREAM_TIMEOUT.error()
    return UPSTREAM_ERROR.error(UNREACHABLE)


def status_error(status: int, headers: Mapping[str, str], content: bytes, operation: str) -> ApiError:
    """The error for an answer whose status is not 200."""
    logger.warning("upstream %s answered %s: %s", operation, status, upstream_error_detail(content))
    if status == 401 and operation == "stream":
        return UPSTREAM_ERROR.error("The upstream service refused the stream token.")
    if status in (401, 403):
        return UPSTREAM_AUTH_FAILED.error()
    if status == 402:
        return UPSTREAM_OUT_OF_CREDITS.error()
    if status == 404:
        return WORKFLOW_NOT_FOUND.error()
    if status == 429:
        # Seconds only (an HTTP date gets the default), ASCII digits, and capped: the value is ours to
        # parse and to pass on, and a mint pause must not outlive any sensible rate-limit window.
        retry_after = headers.get("retry-after", "")
        if RETRY_AFTER_SECONDS.fullmatch(retry_after):
            return rate_limited(str(min(int(retry_after), MAX_RETRY_AFTER_SECONDS)))
        return rate_limited(DEFAULT_RETRY_AFTER)
    return UPSTREAM_ERROR.error()


def rate_limited(retry_after: str) -> ApiError:
    return UPSTREAM_RATE_LIMITED.error(retry_after=retry_after)


def upstream_error_detail(content: bytes) -> str:
    """The upstream's own error text, for the server log only. Both CONTRACT A4 shapes, or raw text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', '')}: {error.get('message', '')}"[:200]
    return str(error)[:200]
