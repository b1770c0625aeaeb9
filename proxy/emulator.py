"""An emulation of the AI Tutor workflow API (CONTRACT Part A), for `demo`, local development and tests.

It behaves like the real service: API-key auth, single-use stream tokens with a TTL, `text/plain`
streams of generated text in small chunks, the non-streaming run with citations, rate-limit headers,
both error-body shapes and the 300-second stream cap. It can also misbehave on purpose: `POST
/_control/faults` queues rules such as "the next stream of wf_x stalls" or "mints answer 402". It
records every request it receives and every stream's fate, and `GET /_control/wait` lets a test await
an event (a stream cancelled by the client, say) instead of sleeping.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Operation = Literal["mint", "stream", "run"]
TOKEN_PREFIX = "pub_tok_"  # noqa: S105 - a prefix, not a secret
MAX_TTL = 300
DEFAULT_TTL = 60
RELEASE_WAIT_LIMIT = 60.0

# The emulated tutor's answer: an opening, a nod to the question's key word and kind (what, why, how),
# two study tips and a closing, each picked by a hash of the request. The question itself is never
# pasted into a sentence; at most one of its words is named, in quotes, so the text stays grammatical
# whatever was asked.
_OPENINGS = (
    "Great question!",
    "Happy to help with this one.",
    "Let's figure this out together.",
    "Good thinking — this is worth understanding well.",
)
_KEYWORD = (
    "The key word here is “{word}”, so we start by saying what it means in plain language.",
    "Everything turns on “{word}”: once that idea is clear, the rest follows.",
    "We'll keep “{word}” in mind and build the picture piece by piece.",
)
_KINDS = {
    "what": "A “what” question wants a clear definition first, then an example that makes it stick.",
    "why": "A “why” question is a hunt for causes, so we ask what happens first and what it leads to.",
    "how": "A “how” question asks for a process, so we walk through what happens, in order.",
}
_TIPS = (
    "Start with what you already know and connect the new idea to it.",
    "Break the idea into smaller pieces, and make sure each one feels solid before moving on.",
    "An everyday example helps: picture explaining it to a friend over lunch.",
    "A quick sketch often shows the pattern faster than a paragraph of words.",
    "When you think you have it, check yourself by working backwards from the answer.",
)
_CLOSINGS = (
    "You're doing great, so keep the questions coming!",
    "Want to try a practice question together next?",
    "Tell me which part feels trickiest, and we'll go deeper there.",
    "Try explaining it back to me in one sentence — that's the best test of understanding.",
)
# Words that say what kind of answer is wanted rather than what it is about.
_NOT_KEYWORD_TEXT = (
    "about also between can could describe difference does explain give help how into me mean means please "
    "should simple simply some tell than that the then there they this what when where which while who why "
    "with would year years old"
)
_NOT_KEYWORDS = frozenset(_NOT_KEYWORD_TEXT.split())
_MAX_KEYWORD_CHARS = 24


def _keyword(question: str) -> str | None:
    """The question's longest content word (the first of equals), or None."""
    words = [word for word in re.findall(r"\w+(?:['\u2019]\w+)*", question) if any(c.isalpha() for c in word)]
    candidates = [w for w in words if w.lower() not in _NOT_KEYWORDS and len(w) <= _MAX_KEYWORD_CHARS]
    return max(candidates, key=len) if candidates else None


def generate_text(workflow_id: str, inputs: dict[str, str]) -> str:
    """Deterministic 'model output' for a request, so tests can check relays byte for byte: a few
    sentences of a tutor's answer, separated by single spaces (see `split_chunks`)."""
    question = next((value for value in inputs.values() if value), "")
    digest = hashlib.sha256(f"{workflow_id}|{sorted(inputs.items())}".encode()).digest()
    sentences = [_OPENINGS[digest[0] % len(_OPENINGS)]]
    word = _keyword(question)
    if word is not None:
        sentences.append(_KEYWORD[digest[1] % len(_KEYWORD)].format(word=word))
    kind = re.match(r"\s*(what|why|how)\b", question, re.IGNORECASE)
    if kind is not None:
        sentences.append(_KINDS[kind[1].lower()])
    first = digest[2] % len(_TIPS)
    second = (first + 1 + digest[3] % (len(_TIPS) - 1)) % len(_TIPS)
    sentences += [_TIPS[min(first, second)], _TIPS[max(first, second)]]
    sentences.append(_CLOSINGS[digest[4] % len(_CLOSINGS)])
    return " ".join(sentences)


def split_chunks(text: str) -> list[str]:
    """Word-sized chunks, the way a model streams tokens."""
    words = text.split(" ")
    return [word + (" " if index < len(words) - 1 else "") for index, word in enumerate(words)]


@dataclass
class FaultRule:
    """What to do to the next matching request(s). Unset fields keep the normal behaviour."""

    op: Operation
    workflow: str | None = None
    status: int | None = None  # answer with this error status instead
    shape: Literal["flat", "nested", "text"] = "flat"  # error body: CONTRACT A4 shapes, or not JSON
    stall: float = 0.0  # seconds before the response starts (ended early by /_control/release)
    hold_after: int | None = None  # stream: after this many chunks, wait for /_control/release
    cut_after: int | None = None  # stream: drop the connection after this many chunks
    delay: float | None = None  # stream: seconds between chunks (slow drip)
    chunks: list[str] | None = None  # stream: send these chunks (latin-1 code points = raw bytes)
    retry_after: int | str | None = None  # with status 429; a string is sent as it is (latin-1)
    drop: bool = False  # start a 200 answer, then drop the connection (a transport error for the client)
    garble: bool = False  # mint, run: a 200 whose body is not the gzip its Content-Encoding says
    result_chars: int | None = None  # run: an answer of this many characters instead
    times: int | None = 1  # how many requests it applies to; None = until reset

    def matches(self, op: Operation, workflow: str | None) -> bool:
        return self.op == op and self.workflow in (None, workflow) and self.times != 0


@dataclass
class EmulatorState:
    api_key: str
    chunk_delay: float = 0.02
    max_stream_seconds: float = 300.0
    rate_limit_per_minute: int = 600
    tokens: dict[str, float] = field(default_factory=dict)
    faults: list[FaultRule] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    window: tuple[int, int] = (0, 0)  # (minute, requests in it)
    changed: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    def take_fault(self, op: Operation, workflow: str | None) -> FaultRule:
        for rule in self.faults:
            if rule.matches(op, workflow):
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return FaultRule(op=op)

    def record_event(self, kind: str, **details: Any) -> None:
        self.events.append({"seq": len(self.events) + 1, "kind": kind, "at": time.time(), **details})
        self._notify()

    def record_request(self, op: Operation, request: Request, body: object) -> None:
        self.requests.append(
            {
                "op": op,
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.query_params),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def rate_limit(self) -> tuple[dict[str, str], bool]:
        """Count a keyed request in the per-minute window: (rate-limit headers, over the limit)."""
        minute = int(time.time() // 60)
        current, used = self.window
        used = used + 1 if current == minute else 1
        self.window = (minute, used)
        limit = self.rate_limit_per_minute
        headers = {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(max(limit - used, 0))}
        return headers, used > limit


def error_body(status: int, message: str, code: str, shape: str) -> Response:
    if shape == "text":
        return Response(f"<html>{status} {message}</html>", status, media_type="text/html")
    if shape == "nested":
        return JSONResponse({"success": False, "error": {"message": message, "code": code}}, status)
    return JSONResponse({"success": False, "error": message}, status)


_MESSAGES = {
    400: ("Invalid request", "invalid_request"),
    401: ("Invalid or missing credentials", "unauthorized"),
    402: ("No credits remaining. Add credits to continue.", "no_credits"),
    404: ("Workflow not found", "workflow_not_found"),
    429: ("Rate limit exceeded", "rate_limited"),
    500: ("Execution failed", "internal_error"),
}


def injected_error(rule: FaultRule) -> Response:
    status = rule.status or 500
    message, code = _MESSAGES.get(status, ("Error", "error"))
    response = error_body(status, message, code, rule.shape)
    if status == 429:
        response.headers["Retry-After"] = str(rule.retry_after or 30)
    return response


def rate_limited(headers: dict[str, str]) -> Response:
    response = error_body(429, "Rate limit exceeded", "rate_limited", "flat")
    response.headers.update({**headers, "Retry-After": "60"})
    return response


class Emulator:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def _authorized(self, request: Request) -> bool:
        expected = f"Bearer {self.state.api_key}"
        return secrets.compare_digest(request.headers.get("authorization", "").encode(), expected.encode())

    async def _stall(self, rule: FaultRule) -> None:
        if rule.stall > 0:
            with anyio.move_on_after(rule.stall):
                await self.state.release.wait()

    async def _faulty_reply(self, rule: FaultRule) -> Response | None:
        """After the rule's stall: what replaces a JSON answer (a dropped connection, a body that is not
        the gzip it claims), or None to answer normally."""
        await self._stall(rule)
        if rule.drop:
            return DroppedReply()
        if rule.garble:
            return Response(b"not gzip", media_type="application/json", headers={"Content-Encoding": "gzip"})
        return None

    async def mint(self, request: Request) -> Response:
        self.state.record_request("mint", request, None)
        rule = self.state.take_fault("mint", None)
        if (faulty := await self._faulty_reply(rule)) is not None:
            return faulty
        if not self._authorized(request):
            return error_body(401, "Invalid API key", "invalid_api_key", "nested")
        headers, limited = self.state.rate_limit()
        if limited:
            return rate_limited(headers)
        if rule.status:
            return injected_error(rule)
        raw_ttl = request.query_params.get("ttl", str(DEFAULT_TTL))
        if not (raw_ttl.isascii() and raw_ttl.isdigit()) or not 1 <= int(raw_ttl) <= MAX_TTL:
            return error_body(400, "ttl must be between 1 and 300 seconds", "invalid_ttl", "nested")
        ttl = int(raw_ttl)
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        self.state.tokens[token] = time.time() + ttl
        self.state.record_event("mint", ttl=ttl, token=token)
        response = JSONResponse({"success": True, "token": token, "ttl": ttl}, headers=headers)
        # Hosted APIs set affinity cookies; a relay that kept and replayed them would mix users.
        response.set_cookie("upstream_affinity", secrets.token_hex(4))
        return response

    async def run(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        inputs = await _json_inputs(request)
        self.state.record_request("run", request, inputs)
        rule = self.state.take_fault("run", workflow_id)
        if (faulty := await self._faulty_reply(rule)) is not None:
            return faulty
        if not self._authorized(request):
            return error_body(401, "Invalid API key", "invalid_api_key", "nested")
        if inputs is None:
            return error_body(400, "Body must be a flat JSON object", "invalid_request", "flat")
        headers, limited = self.state.rate_limit()
        if limited:
            return rate_limited(headers)
        if rule.status:
            return injected_error(rule)
        self.state.record_event("run", workflow=workflow_id)
        body = {
            "success": True,
            "result": generate_text(workflow_id, inputs) if rule.result_chars is None else "r" * rule.result_chars,
            "citations": [f"https://example.org/sources/{workflow_id}"],
        }
        return JSONResponse(body, headers=headers)

    async def stream(self, request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        inputs = await _json_inputs(request)
        self.state.record_request("stream", request, inputs)
        rule = self.state.take_fault("stream", workflow_id)
        token = request.query_params.get("token", "")
        expires_at = self.state.tokens.pop(token, None)  # single use: gone on first stream request
        if expires_at is None or expires_at < time.time():
            return error_body(401, "Invalid, expired or already used token", "invalid_token", "nested")
        if inputs is None:
            return error_body(400, "Body must be a flat JSON object", "invalid_request", "flat")
        return StreamReply(self, workflow_id, inputs, rule)


async def _json_inputs(request: Request) -> dict[str, str] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        return None
    return body


class DroppedReply(Response):
    """Promises a body and hangs up before sending it: the server then closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})


class StreamReply(Response):
    """A streamed run that notices the client leaving at any point, even before its first byte."""

    def __init__(self, emulator: Emulator, workflow_id: str, inputs: dict[str, str], rule: FaultRule) -> None:
        super().__init__()
        self.emulator = emulator
        self.workflow_id = workflow_id
        self.inputs = inputs
        self.rule = rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.emulator.state
        stream_id = secrets.token_hex(4)
        state.record_event("stream_start", workflow=self.workflow_id, stream=stream_id)
        outcome = "cancelled"
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            try:
                outcome = await self._produce(send)
            finally:
                state.record_event("stream_end", workflow=self.workflow_id, stream=stream_id, reason=outcome)
                group.cancel_scope.cancel()

    async def _produce(self, send: Send) -> str:
        rule, state = self.rule, self.emulator.state
        await self.emulator._stall(rule)
        if rule.drop:
            await DroppedReply()({"type": "http"}, _never, send)
            return "dropped"
        if rule.status:
            await injected_error(rule)({"type": "http"}, _never, send)
            return f"status_{rule.status}"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"access-control-allow-origin", b"*"),
                ],
            }
        )
        if rule.chunks is not None:
            pieces = [chunk.encode("latin-1") for chunk in rule.chunks]
        else:
            pieces = [chunk.encode() for chunk in split_chunks(generate_text(self.workflow_id, self.inputs))]
        delay = state.chunk_delay if rule.delay is None else rule.delay
        with anyio.move_on_after(state.max_stream_seconds) as cap:
            for index, piece in enumerate(pieces):
                if rule.cut_after is not None and index == rule.cut_after:
                    return "cut"  # returning mid-body makes the server drop the connection
                if rule.hold_after is not None and index == rule.hold_after:
                    with anyio.move_on_after(RELEASE_WAIT_LIMIT):
                        await state.release.wait()
                elif index and delay:
                    await anyio.sleep(delay)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "timeout" if cap.cancelled_caught else "complete"


async def _never() -> dict[str, Any]:  # pragma: no cover - an error Response never reads
    await anyio.sleep(math.inf)
    return {}


def _control_routes(state: EmulatorState) -> list[Route]:
    async def add_fault(request: Request) -> Response:
        try:
            rule = FaultRule(**await request.json())
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        state.faults.append(rule)
        return JSONResponse(asdict(rule), 201)

    async def reset(request: Request) -> Response:
        state.faults.clear()
        state.requests.clear()
        state.events.clear()
        state.release.set()
        state.release = anyio.Event()
        return Response(status_code=204)

    async def release(request: Request) -> Response:
        state.release.set()
        state.release = anyio.Event()
        return Response(status_code=204)

    async def list_requests(request: Request) -> Response:
        return JSONResponse(state.requests)

    async def list_events(request: Request) -> Response:
        return JSONResponse(_select(state.events, request))

    async def wait(request: Request) -> Response:
        """Answers once `count` events match (`kind`, `workflow`, `reason`), or 408 after `timeout`."""
        count = int(request.query_params.get("count", "1"))
        with anyio.move_on_after(float(request.query_params.get("timeout", "10"))):
            while len(matched := _select(state.events, request)) < count:
                await state.changed.wait()
            return JSONResponse(matched)
        return JSONResponse(_select(state.events, request), 408)

    return [
        Route("/_control/faults", add_fault, methods=["POST"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/release", release, methods=["POST"]),
        Route("/_control/requests", list_requests),
        Route("/_control/events", list_events),
        Route("/_control/wait", wait),
    ]


def _select(events: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
    wanted = {k: v for k, v in request.query_params.items() if k in ("kind", "workflow", "reason")}
    return [event for event in events if all(str(event.get(k)) == v for k, v in wanted.items())]


def create_emulator(
    api_key: str, *, chunk_delay: float = 0.02, max_stream_seconds: float = 300.0, rate_limit_per_minute: int = 600
) -> Starlette:
    state = EmulatorState(
        api_key=api_key,
        chunk_delay=chunk_delay,
        max_stream_seconds=max_stream_seconds,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    emulator = Emulator(state)
    handlers: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/api/v1/token", emulator.mint, "GET"),
        ("/api/v1/run/{workflow_id}/stream", emulator.stream, "POST"),
        ("/api/v1/run/{workflow_id}", emulator.run, "POST"),
    ]
    routes = [Route(path, handler, methods=[method]) for path, handler, method in handlers]
    app = Starlette(routes=routes + _control_routes(state))
    app.state.emulator = state
    return app
