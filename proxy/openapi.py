"""`GET /openapi.json`: the public interface (CONTRACT Part B) as OpenAPI 3.1.

The document lists exactly the routes this deployment serves (it follows BFF_AUTH and BFF_MODES);
tests/test_openapi.py fails if a route is served that is not described here, or the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from proxy import __version__
from proxy.services import services

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): {"description": "Error", "content": _json(_ref("Error"))} for status in statuses}


SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Session": {
        "type": "object",
        "required": ["user", "expires_at", "limits"],
        "properties": {
            "user": {
                "type": "object",
                "required": ["id", "kind"],
                "properties": {"id": {"type": "string"}, "kind": {"type": "string"}},
            },
            "expires_at": {"type": "string", "format": "date-time"},
            "limits": {"type": "object"},
        },
    },
    "Inputs": {
        "type": "object",
        "description": "Workflow input variables: names matching [A-Za-z_][A-Za-z0-9_]{0,63}, text values.",
        "additionalProperties": {"type": "string"},
    },
    "TokenRequest": {
        "type": "object",
        "required": ["workflow"],
        "additionalProperties": False,
        "properties": {"workflow": {"type": "string"}, "ttl": {"type": "integer", "minimum": 1}},
    },
    "Token": {
        "type": "object",
        "required": ["token", "ttl", "expires_at", "stream_url"],
        "properties": {
            "token": {"type": "string"},
            "ttl": {"type": "integer"},
            "expires_at": {"type": "string", "format": "date-time"},
            "stream_url": {"type": "string", "format": "uri"},
        },
    },
    "RunResult": {
        "type": "object",
        "required": ["result", "citations"],
        "properties": {"result": {"type": "string"}, "citations": {"type": "array", "items": {"type": "string"}}},
    },
    "ChatRequest": {
        "type": "object",
        "description": "A Vercel AI SDK useChat request: v5+ {id, messages[parts], trigger, messageId?}, "
        "the single-message form {id, message}, or v3/v4 {messages[{role, content}]}. Other fields are ignored.",
        "anyOf": [{"required": ["messages"]}, {"required": ["message"]}],
        "properties": {
            "id": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "message": _ref("ChatMessage"),
            "trigger": {"type": "string", "enum": ["submit-message", "regenerate-message"]},
            "messageId": {"type": "string"},
        },
    },
    "ChatMessage": {
        "type": "object",
        "description": "The latest message must be the user's; system messages are dropped.",
        "required": ["role"],
        "properties": {
            "id": {"type": "string"},
            "role": {"type": "string", "enum": ["user", "assistant", "system"]},
            "parts": {"type": "array", "items": _ref("ChatPart"), "description": "AI SDK 5+"},
            "content": {"type": "string", "description": "AI SDK 3/4"},
        },
    },
    "ChatPart": {
        "type": "object",
        "description": "`text` parts carry the text; `file` parts with an image/* mediaType an https: image URL.",
        "required": ["type"],
        "properties": {
            "type": {"type": "string"},
            "text": {"type": "string"},
            "mediaType": {"type": "string"},
            "url": {"type": "string"},
        },
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "UiStreamEvent": {
        "type": "object",
        "description": "One server-sent event of the AI SDK UI message stream.",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": "A UI message chunk as JSON, or [DONE] at the end."}},
    },
}

SESSION_OK = {"200": {"description": "Signed in", "content": _json(_ref("Session"))}}
NO_CONTENT = {"204": {"description": "Done"}}
TEXT_STREAM = {"text/plain": {"schema": {"type": "string"}}}


def _text_errors(*statuses: int) -> dict[str, Schema]:
    """The chat routes' errors: a short text body, which useChat shows as it is."""
    return {str(status): {"description": "Error, as short text", "content": TEXT_STREAM} for status in statuses}


PROTOCOL_PARAMETER: Schema = {
    "name": "protocol",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["ui", "text", "data"], "default": "ui"},
}
CHAT_STREAM_OK: dict[str, Schema] = {
    "200": {
        "description": "UI message stream (SSE), plain text, or v4 data stream",
        "content": {"text/event-stream": {"schema": _ref("UiStreamEvent")}, **TEXT_STREAM},
    }
}
OPERATIONS: dict[tuple[str, str], Schema] = {
    ("post", "/auth/guest"): {
        "summary": "Start an anonymous session",
        "responses": {**SESSION_OK, **_errors(403, 413, 422, 429, 503)},
    },
    ("post", "/auth/exchange"): {
        "summary": "Exchange an identity-provider JWT (Authorization: Bearer) for a session",
        "responses": {**SESSION_OK, **_errors(401, 403, 413, 422, 429, 503)},
    },
    ("post", "/auth/login"): {
        "summary": "Sign in with a username and password",
        "requestBody": {
            "required": True,
            "content": _json(
                {
                    "type": "object",
                    "required": ["username", "password"],
                    "properties": {"username": {"type": "string"}, "password": {"type": "string"}},
                }
            ),
        },
        "responses": {**SESSION_OK, **_errors(401, 403, 413, 422, 429, 503)},
    },
    ("get", "/auth/session"): {
        "summary": "The current session; never extends it",
        "responses": {**SESSION_OK, **_errors(401, 503)},
    },
    ("post", "/auth/logout"): {
        "summary": "End this session",
        "responses": {**NO_CONTENT, **_errors(403, 413, 422, 503)},
    },
    ("post", "/auth/logout-all"): {
        "summary": "End every session of this user",
        "responses": {**NO_CONTENT, **_errors(401, 403, 413, 422, 503)},
    },
    ("post", "/api/token"): {
        "summary": "Mint a single-use upstream stream token (token mode)",
        "requestBody": {"required": True, "content": _json(_ref("TokenRequest"))},
        "responses": {
            "200": {"description": "A fresh token", "content": _json(_ref("Token"))},
            **_errors(401, 402, 403, 404, 413, 422, 429, 502, 503, 504),
        },
    },
    ("post", "/api/workflows/{alias}/stream"): {
        "summary": "Relay a workflow run as a plain-text stream",
        "requestBody": {"required": True, "content": _json(_ref("Inputs"))},
        "responses": {
            "200": {"description": "The generated text, streamed", "content": TEXT_STREAM},
            **_errors(401, 402, 403, 404, 413, 422, 429, 502, 503, 504),
        },
    },
    ("post", "/api/workflows/{alias}/run"): {
        "summary": "Run a workflow and return the whole answer",
        "requestBody": {"required": True, "content": _json(_ref("Inputs"))},
        "responses": {
            "200": {"description": "The answer", "content": _json(_ref("RunResult"))},
            **_errors(401, 402, 403, 404, 413, 422, 429, 502, 503, 504),
        },
    },
    ("post", "/api/chat/{alias}"): {
        "summary": "Relay a workflow run in an AI SDK chat protocol (useChat)",
        "parameters": [PROTOCOL_PARAMETER],
        "requestBody": {"required": True, "content": _json(_ref("ChatRequest"))},
        "responses": {
            **CHAT_STREAM_OK,
            **_text_errors(401, 402, 403, 404, 413, 422, 429, 502, 503, 504),
        },
    },
    ("get", "/api/chat/{alias}/{chat_id}/stream"): {
        "summary": "Resume a chat's answer (useChat resume: true): replayed from its first chunk, then live",
        # Any alias: a 204 is the answer for every unknown one, so it reveals nothing.
        "parameters": [
            {"name": "alias", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "chat_id", "in": "path", "required": True, "schema": {"type": "string"}},
            PROTOCOL_PARAMETER,
        ],
        "responses": {**CHAT_STREAM_OK, **NO_CONTENT, **_text_errors(422, 503)},
    },
    ("get", "/api/chat/{alias}"): {
        "summary": "Resume a chat's answer for AI SDK 4 (experimental_resume); an empty stream when none",
        "parameters": [
            {"name": "alias", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "chatId", "in": "query", "required": True, "schema": {"type": "string"}},
            {**PROTOCOL_PARAMETER, "schema": {"type": "string", "enum": ["ui", "text", "data"], "default": "data"}},
        ],
        "responses": {**CHAT_STREAM_OK, **_text_errors(422, 503)},
    },
    ("post", "/api/chat/{alias}/{chat_id}/stop"): {
        "summary": "Stop a chat's answer on whichever replica runs it",
        "parameters": [
            {"name": "alias", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "chat_id", "in": "path", "required": True, "schema": {"type": "string"}},
        ],
        "responses": {**NO_CONTENT, **_text_errors(401, 403, 413, 422, 503)},
    },
    ("get", "/api/runs/{run_id}/stream"): {
        "summary": "A relayed answer as plain text from character `from`: replayed, then live",
        "parameters": [
            {"name": "from", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
        ],
        "responses": {
            "200": {"description": "The answer's text from that character", "content": TEXT_STREAM},
            **_errors(401, 404, 422, 503),
        },
    },
    ("post", "/api/runs/{run_id}/stop"): {
        "summary": "Stop a relayed answer on whichever replica runs it",
        "responses": {**NO_CONTENT, **_errors(401, 403, 404, 413, 422, 503)},
    },
    ("get", "/"): {
        "summary": "What this service is, its version, and where its routes are described",
        "responses": {"200": {"description": "The service", "content": _json({"type": "object"})}},
    },
    ("get", "/healthz"): {
        "summary": "Process alive",
        "responses": {"200": {"description": "Alive", "content": _json(_ref("Status"))}},
    },
    ("get", "/readyz"): {
        "summary": "Storage reachable and not draining",
        "responses": {
            "200": {"description": "Ready", "content": _json(_ref("Status"))},
            "503": {"description": "Not ready", "content": _json(_ref("Status"))},
        },
    },
    ("get", "/metrics"): {
        "summary": "Prometheus metrics",
        "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    },
    ("get", "/openapi.json"): {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}},
    },
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
    found = set()
    for route in routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                if method != "HEAD":
                    found.add((method.lower(), route.path))
    return found


_STRING: Schema = {"type": "string"}


def build_openapi(routes: Sequence[BaseRoute], aliases: Sequence[str] = ()) -> Schema:
    """The document for `routes`; `aliases`, the configured workflows, are what `{alias}` and a token
    request's `workflow` accept (they are public: browsers name them)."""
    alias_schema: Schema = {"type": "string", "enum": list(aliases)} if aliases else {"type": "string"}
    paths: dict[str, dict[str, Schema]] = {}
    for method, path in sorted(served_operations(routes) & set(OPERATIONS)):
        operation = dict(OPERATIONS[(method, path)])
        own = list(operation.get("parameters", []))
        named = {parameter["name"] for parameter in own}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": alias_schema if name == "alias" else _STRING}
            for name in _path_parameters(path)
            if name not in named
        ] + own
        if method == "post":
            parameters.append(STATE_CHANGING_HEADER)
        if parameters:
            operation["parameters"] = parameters
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "workflow-bff", "version": __version__},
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, "TokenRequest": _token_request(alias_schema)}},
    }


def _token_request(alias_schema: Schema) -> Schema:
    schema = dict(SCHEMAS["TokenRequest"])
    schema["properties"] = {**schema["properties"], "workflow": alias_schema}
    return schema


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
