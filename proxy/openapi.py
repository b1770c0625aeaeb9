"""`GET /openapi.json`: the public interface (CONTRACT Part B) as OpenAPI 3.1, generated.

The schemas are the models the routes validate and answer with (proxy/models.py and the modules it
names), rendered by pydantic; what is written here is only what a route table knows: each operation's
summary, its body, its answers and the errors it can give, named by their catalogue entries
(proxy/errors.py), which give their statuses. Whether errors are JSON or text is the route's own
declaration (`TextErrorsRoute`). The document lists exactly the routes this deployment serves (it
follows BFF_AUTH and BFF_MODES); tests/test_openapi.py fails if a route is served that is not
described here, or the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import CoreSchema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy import __version__
from proxy.auth.password import LoginRequest
from proxy.chat import ChatRequest
from proxy.errors import (
    ANSWER_TOO_LARGE,
    AUTH_UNAVAILABLE,
    BODY_TOO_LARGE,
    BUDGET_EXHAUSTED,
    CSRF_FAILED,
    INVALID_INPUT,
    INVALID_LOGOUT_TOKEN,
    RATE_LIMITED,
    SHUTTING_DOWN,
    STORAGE_UNAVAILABLE,
    TOO_MANY_STREAMS,
    UNAUTHENTICATED,
    UNKNOWN_RUN,
    UNKNOWN_WORKFLOW,
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_ERROR,
    UPSTREAM_OUT_OF_CREDITS,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    WORKFLOW_NOT_FOUND,
    Entry,
    TextErrorsRoute,
)
from proxy.models import Error, RunResult, SessionInfo, Status, Token, TokenRequest, UiStreamEvent, Usage
from proxy.services import services
from proxy.workflows import WorkflowInputs

Schema = dict[str, Any]
JSON = "application/json"
TEXT = "text/plain"
FORM = "application/x-www-form-urlencoded"
STRING: Schema = {"type": "string"}
OBJECT: Schema = {"type": "object"}


@dataclass(frozen=True)
class Answer:
    description: str
    content: Mapping[str, type[BaseModel] | Schema] = field(default_factory=dict)  # media type → shape


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: Mapping[int, Answer]
    errors: tuple[Entry, ...] = ()
    body: type[BaseModel] | None = None
    parameters: tuple[Schema, ...] = ()  # besides the path's own and the CSRF header
    csrf: bool = True  # a POST needs X-CSRF: 1 (all but the identity provider's back-channel logout)
    form: Schema | None = None  # a form body (application/x-www-form-urlencoded) instead of `body`


SIGNED_IN = {200: Answer("Signed in", {JSON: SessionInfo})}
DONE = {204: Answer("Done")}
# With OpenID Connect, the URL at which the browser ends its session at the identity provider too.
LOGOUT_URL: Schema = {"type": "object", "properties": {"logout_url": STRING}, "required": ["logout_url"]}
SIGNED_OUT = {
    200: Answer("Signed out here; visit logout_url to sign out at the identity provider", {JSON: LOGOUT_URL}),
    **DONE,
}
CHAT_STREAM = {
    200: Answer(
        "UI message stream (SSE), plain text, or v4 data stream", {"text/event-stream": UiStreamEvent, TEXT: STRING}
    )
}
# Every state-changing route: the CSRF and origin checks, and the body policy.
STATE_CHANGING = (CSRF_FAILED, BODY_TOO_LARGE, INVALID_INPUT)
UPSTREAM_ERRORS = (
    UPSTREAM_OUT_OF_CREDITS,
    WORKFLOW_NOT_FOUND,
    UPSTREAM_AUTH_FAILED,
    UPSTREAM_ERROR,
    UPSTREAM_RATE_LIMITED,
    UPSTREAM_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
)
SIGN_IN_ERRORS = (*STATE_CHANGING, RATE_LIMITED, STORAGE_UNAVAILABLE)
MINT_ERRORS = (*STATE_CHANGING, UNAUTHENTICATED, UNKNOWN_WORKFLOW, RATE_LIMITED, STORAGE_UNAVAILABLE, *UPSTREAM_ERRORS)
# A run's admission (slots, budget), and how it can end before its answer started.
RELAY_ERRORS = (*MINT_ERRORS, TOO_MANY_STREAMS, BUDGET_EXHAUSTED, ANSWER_TOO_LARGE, SHUTTING_DOWN)
RESUME_ERRORS = (INVALID_INPUT, STORAGE_UNAVAILABLE)
STOP_ERRORS = (*STATE_CHANGING, UNAUTHENTICATED, STORAGE_UNAVAILABLE)


def _protocol(default: str) -> Schema:
    schema = {"type": "string", "enum": ["ui", "text", "data"], "default": default}
    return {"name": "protocol", "in": "query", "required": False, "schema": schema}


def _path_parameter(name: str, schema: Schema = STRING) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/auth/guest"): Operation("Start an anonymous session", SIGNED_IN, SIGN_IN_ERRORS),
    ("post", "/auth/exchange"): Operation(
        "Exchange an identity-provider JWT (Authorization: Bearer) for a session",
        SIGNED_IN,
        (*SIGN_IN_ERRORS, UNAUTHENTICATED, AUTH_UNAVAILABLE),
    ),
    ("post", "/auth/login"): Operation(
        "Sign in with a username and password", SIGNED_IN, (*SIGN_IN_ERRORS, UNAUTHENTICATED), body=LoginRequest
    ),
    ("get", "/auth/login"): Operation(
        "Sign in with the identity provider (OpenID Connect): a redirect to it",
        {302: Answer("To the identity provider's sign-in page")},
        (INVALID_INPUT, RATE_LIMITED, AUTH_UNAVAILABLE, STORAGE_UNAVAILABLE),
        parameters=(
            {
                "name": "returnTo",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "default": "/"},
                "description": "A path on this site to return to once signed in.",
            },
        ),
    ),
    ("get", "/auth/callback"): Operation(
        "Where the identity provider sends the browser back: signs in, then moves on to returnTo",
        {
            200: Answer("Signed in: a page that moves on to returnTo", {"text/html": STRING}),
            303: Answer("Not signed in: to /?auth_error=<code>"),
        },
    ),
    ("post", "/auth/backchannel-logout"): Operation(
        "OpenID Connect back-channel logout: the identity provider ends sessions (a form with logout_token; no X-CSRF)",
        {200: Answer("The sessions of that provider session or user are over")},
        (INVALID_LOGOUT_TOKEN, BODY_TOO_LARGE, INVALID_INPUT, AUTH_UNAVAILABLE, STORAGE_UNAVAILABLE),
        csrf=False,
        form={"type": "object", "properties": {"logout_token": STRING}, "required": ["logout_token"]},
    ),
    ("get", "/auth/session"): Operation(
        "The current session; never extends it", SIGNED_IN, (UNAUTHENTICATED, STORAGE_UNAVAILABLE)
    ),
    ("post", "/auth/logout"): Operation("End this session", SIGNED_OUT, (*STATE_CHANGING, STORAGE_UNAVAILABLE)),
    ("post", "/auth/logout-all"): Operation("End every session of this user", SIGNED_OUT, STOP_ERRORS),
    ("post", "/api/token"): Operation(
        "Mint a single-use upstream stream token (token mode)",
        {200: Answer("A fresh token", {JSON: Token})},
        MINT_ERRORS,
        body=TokenRequest,
    ),
    ("post", "/api/workflows/{alias}/stream"): Operation(
        "Relay a workflow run as a plain-text stream",
        {200: Answer("The generated text, streamed", {TEXT: STRING})},
        RELAY_ERRORS,
        body=WorkflowInputs,
    ),
    ("post", "/api/workflows/{alias}/run"): Operation(
        "Run a workflow and return the whole answer",
        {200: Answer("The answer", {JSON: RunResult})},
        RELAY_ERRORS,
        body=WorkflowInputs,
    ),
    ("post", "/api/chat/{alias}"): Operation(
        "Relay a workflow run in an AI SDK chat protocol (useChat)",
        CHAT_STREAM,
        RELAY_ERRORS,
        body=ChatRequest,
        parameters=(_protocol("ui"),),
    ),
    ("get", "/api/chat/{alias}/{chat_id}/stream"): Operation(
        "Resume a chat's answer (useChat resume: true): replayed from its first chunk, then live",
        {**CHAT_STREAM, **DONE},
        RESUME_ERRORS,
        # Any alias: a 204 is the answer for every unknown one, so it reveals nothing.
        parameters=(_path_parameter("alias"), _protocol("ui")),
    ),
    ("get", "/api/chat/{alias}"): Operation(
        "Resume a chat's answer for AI SDK 4 (experimental_resume); an empty stream when none",
        CHAT_STREAM,
        RESUME_ERRORS,
        parameters=(
            _path_parameter("alias"),
            {"name": "chatId", "in": "query", "required": True, "schema": STRING},
            _protocol("data"),
        ),
    ),
    ("post", "/api/chat/{alias}/{chat_id}/stop"): Operation(
        "Stop a chat's answer on whichever replica runs it",
        DONE,
        STOP_ERRORS,
        parameters=(_path_parameter("alias"),),
    ),
    ("get", "/api/runs/{run_id}/stream"): Operation(
        "A relayed answer as plain text from character `from`: replayed, then live",
        {200: Answer("The answer's text from that character", {TEXT: STRING})},
        (UNAUTHENTICATED, UNKNOWN_RUN, INVALID_INPUT, STORAGE_UNAVAILABLE),
        parameters=({"name": "from", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},),
    ),
    ("post", "/api/runs/{run_id}/stop"): Operation(
        "Stop a relayed answer on whichever replica runs it", DONE, (*STOP_ERRORS, UNKNOWN_RUN)
    ),
    ("get", "/api/usage"): Operation(
        "The signed-in user's output today, rate limits, stream slots and open answers; counts against nothing",
        {200: Answer("Usage", {JSON: Usage})},
        (UNAUTHENTICATED, STORAGE_UNAVAILABLE),
    ),
    ("get", "/"): Operation(
        "What this service is, its version, and where its routes are described",
        {200: Answer("The service", {JSON: OBJECT})},
    ),
    ("get", "/healthz"): Operation("Process alive", {200: Answer("Alive", {JSON: Status})}),
    ("get", "/readyz"): Operation(
        "Storage reachable and not draining",
        {200: Answer("Ready", {JSON: Status}), 503: Answer("Not ready", {JSON: Status})},
    ),
    ("get", "/metrics"): Operation("Prometheus metrics", {200: Answer("Metrics", {TEXT: STRING})}),
    ("get", "/openapi.json"): Operation("This document", {200: Answer("OpenAPI 3.1", {JSON: OBJECT})}),
}

STATE_CHANGING_HEADER = {
    "name": "X-CSRF",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "const": "1"},
    "description": "Required on every state-changing request (CSRF defence).",
}


def served_operations(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """(method, path) of every plain route, lower-case methods, HEAD left out."""
    return set(_served(routes))


def _served(routes: Sequence[BaseRoute]) -> dict[tuple[str, str], Route]:
    found = {}
    for route in routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    found[(method.lower(), route.path)] = route
    return found


def build_openapi(routes: Sequence[BaseRoute], aliases: Sequence[str] = ()) -> Schema:
    """The document for `routes`; `aliases`, the configured workflows, are what `{alias}` and a token
    request's `workflow` accept (they are public: browsers name them)."""
    alias_schema: Schema = {"type": "string", "enum": list(aliases)} if aliases else STRING
    paths: dict[str, dict[str, Schema]] = {}
    served = _served(routes)
    for method, path in sorted(served.keys() & OPERATIONS.keys()):
        text_errors = isinstance(served[(method, path)], TextErrorsRoute)
        operation = OPERATIONS[(method, path)]
        paths.setdefault(path, {})[method] = _operation(method, path, operation, alias_schema, text_errors=text_errors)
    schemas = _schemas()
    schemas["TokenRequest"]["properties"]["workflow"] = alias_schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "workflow-bff", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _operation(method: str, path: str, operation: Operation, alias_schema: Schema, *, text_errors: bool) -> Schema:
    own = {parameter["name"]: parameter for parameter in operation.parameters}
    for_path = [_path_parameter(name, alias_schema if name == "alias" else STRING) for name in _path_parameters(path)]
    parameters = [own.pop(parameter["name"], parameter) for parameter in for_path] + list(own.values())
    if method == "post" and operation.csrf:
        parameters.append(STATE_CHANGING_HEADER)
    answers = {**operation.answers, **_errors(operation.errors, text=text_errors)}
    rendered: Schema = {
        "summary": operation.summary,
        "responses": {str(status): _answer(answer) for status, answer in answers.items()},
    }
    if parameters:
        rendered["parameters"] = parameters
    if operation.body is not None:
        rendered["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(operation.body)}}}
    if operation.form is not None:
        rendered["requestBody"] = {"required": True, "content": {FORM: {"schema": operation.form}}}
    return rendered


def _errors(entries: Sequence[Entry], *, text: bool) -> dict[int, Answer]:
    """One answer per status, naming the codes it stands for."""
    codes: dict[int, list[str]] = {}
    for entry in entries:
        codes.setdefault(entry.status, []).append(entry.code)
    content: Mapping[str, type[BaseModel] | Schema] = {TEXT: STRING} if text else {JSON: Error}
    kind = "Error, as short text, its code in X-Error-Code" if text else "Error"
    return {status: Answer(f"{kind}: {', '.join(codes[status])}", content) for status in sorted(codes)}


def _answer(answer: Answer) -> Schema:
    rendered: Schema = {"description": answer.description}
    if answer.content:
        rendered["content"] = {
            media: {"schema": shape if isinstance(shape, dict) else _ref(shape)}
            for media, shape in answer.content.items()
        }
    return rendered


def _ref(model: type[BaseModel]) -> Schema:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schemas() -> dict[str, Schema]:
    """Every model an operation names, and the models they are made of, as pydantic renders them:
    request bodies as they are validated, answers as they are sent."""
    bodies = {operation.body for operation in OPERATIONS.values() if operation.body is not None}
    answers = {
        shape
        for operation in OPERATIONS.values()
        for answer in operation.answers.values()
        for shape in answer.content.values()
        if not isinstance(shape, dict)
    }
    validated: list[tuple[type[BaseModel], JsonSchemaMode]] = [(model, "validation") for model in bodies]
    sent: list[tuple[type[BaseModel], JsonSchemaMode]] = [(model, "serialization") for model in answers | {Error}]
    models = sorted(validated + sent, key=lambda pair: pair[0].__name__)
    _, document = models_json_schema(
        models, ref_template="#/components/schemas/{model}", schema_generator=UntitledFields
    )
    schemas: dict[str, Schema] = document["$defs"]
    return schemas


class UntitledFields(GenerateJsonSchema):
    """Models keep their titles; fields go without ("Mediatype" says less than the name beside it)."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def openapi_route() -> Route:
    """The route serving the document, built from the app's own routing table on first request."""
    cache: list[Schema] = []

    async def endpoint(request: Request) -> Response:
        if not cache:
            cache.append(build_openapi(request.app.routes, services(request).workflows.aliases()))
        return JSONResponse(cache[0])

    return Route("/openapi.json", endpoint, methods=["GET"])
