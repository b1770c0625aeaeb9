"""The boundary models (proxy/models.py and the modules that define bodies): what each body may be, what
a client is told when it is not, and that /openapi.json describes the very same models. In-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import MISSING, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.auth.password import LoginRequest
from proxy.chat import BAD_PARTS, NO_IMAGES, NO_ROLE, PARTS, ChatRequest, parse_chat_request
from proxy.errors import ApiError
from proxy.models import BodyModel, Refusals, TokenRequest, refused
from proxy.openapi import OPERATIONS, UntitledFields, build_openapi, openapi_route
from proxy.workflows import Workflow, WorkflowConfigError, WorkflowInputs, WorkflowRegistry, parse_workflows


def refusal(parse: Any, body: object) -> str:
    with pytest.raises(ApiError) as refused_with:
        parse(body)
    assert (refused_with.value.status, refused_with.value.code) == (422, "invalid_input")
    return refused_with.value.message


class Sample(BodyModel):
    name: str = Field(pattern="^[a-z]+$")
    tags: list[str] | MISSING = MISSING

    refusals: ClassVar[Refusals] = Refusals(
        "Send a sample.", {"name": "Name it in lower case.", "tags.*": "Tags are text."}
    )


class ShapeFirst(Sample):
    refusals: ClassVar[Refusals] = Refusals(
        "Send a sample.", {":shape": "Wrong shape.", "name": "Name it in lower case."}
    )


# Refusals: our message for each place, the most important first


def test_the_most_important_place_is_told_whatever_order_the_problems_come_in() -> None:
    assert refusal(Sample.parse, {"tags": [1], "name": "UPPER"}) == "Name it in lower case."
    assert refusal(Sample.parse, {"name": "lower", "tags": ["a", 1]}) == "Tags are text."
    assert refusal(Sample.parse, {"name": "lower", "tags": "a"}) == "Send a sample."  # no place: the usage


def test_a_shape_place_takes_only_missing_unknown_or_mistyped_values() -> None:
    assert refusal(ShapeFirst.parse, {"name": "UPPER", "tags": [1]}) == "Wrong shape."
    assert refusal(ShapeFirst.parse, {"tags": ["a"]}) == "Wrong shape."  # name missing
    assert refusal(ShapeFirst.parse, {"name": "UPPER", "tags": ["a"]}) == "Name it in lower case."


def test_a_body_of_the_wrong_kind_is_told_the_usage() -> None:
    assert refusal(TokenRequest.parse, ["tutor"]) == 'Send {"workflow": "<name>"} with an optional "ttl" in seconds.'


class Braced(BodyModel):
    name: str
    refusals: ClassVar[Refusals] = Refusals("usage")

    @field_validator("name")
    @classmethod
    def _never(cls, value: str) -> str:
        raise refused('Send {"name": "{name}"}')


def test_a_rule_of_our_own_is_told_word_for_word_even_with_braces() -> None:
    assert refusal(Braced.parse, {"name": "x"}) == 'Send {"name": "{name}"}'


def test_an_explicit_null_is_not_taken_for_a_field_left_out() -> None:
    assert TokenRequest.parse({"workflow": "tutor"}).ttl is MISSING
    assert refusal(TokenRequest.parse, {"workflow": "tutor", "ttl": None}) == (
        '"ttl" must be a whole number of seconds, at least 1.'
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, 'Send {"workflow": "<name>"} with an optional "ttl" in seconds.'),
        ({"workflow": 3, "extra": 1}, 'Send {"workflow": "<name>"} with an optional "ttl" in seconds.'),
        ({"workflow": "tutor", "zeta": 1, "alpha": 2}, "Unknown field: 'alpha'."),
        ({"workflow": "tutor", "ttl": "5"}, '"ttl" must be a whole number of seconds, at least 1.'),
        ({"workflow": "tutor", "ttl": True}, '"ttl" must be a whole number of seconds, at least 1.'),
        ({"workflow": "tutor", "ttl": 5.0}, '"ttl" must be a whole number of seconds, at least 1.'),
        ({"workflow": "tutor", "ttl": 0}, '"ttl" must be a whole number of seconds, at least 1.'),
    ],
)
def test_a_token_request_is_refused_with_the_message_for_its_first_problem(body: object, message: str) -> None:
    assert refusal(TokenRequest.parse, body) == message


def test_an_unknown_workflow_is_told_before_a_bad_ttl_as_it_always_was() -> None:
    """0926b52 looked the workflow up before it judged the ttl: 404 `unknown_workflow`, not a 422."""
    known = WorkflowRegistry([Workflow(alias="tutor", id="wf_tutor")]).get

    with pytest.raises(ApiError) as unknown:
        TokenRequest.parse_for({"workflow": "nope", "ttl": 0}, known)
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_workflow")
    ttl = '"ttl" must be a whole number of seconds, at least 1.'
    assert refusal(lambda body: TokenRequest.parse_for(body, known), {"workflow": "tutor", "ttl": 0}) == ttl
    # The body's shape is still told first: a workflow that is no string, an unknown field.
    assert refusal(lambda body: TokenRequest.parse_for(body, known), {"workflow": 5, "ttl": 0}).startswith("Send")
    assert refusal(lambda body: TokenRequest.parse_for(body, known), {"workflow": "nope", "ttl": 0, "x": 1}) == (
        "Unknown field: 'x'."
    )
    assert TokenRequest.parse_for({"workflow": "nope"}, known).workflow == "nope"  # the route looks it up


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"username": "alice"}, 'Send {"username": "...", "password": "..."}.'),
        ({"username": "alice", "password": "x", "remember": True}, 'Send {"username": "...", "password": "..."}.'),
        ({"username": "", "password": 5}, 'Send {"username": "...", "password": "..."}.'),
        ({"username": "../etc", "password": "secret"}, "That is not a valid username."),
        ({"username": "alice", "password": ""}, "The password must be 1 to 1024 characters."),
        ({"username": "alice", "password": "x" * 1025}, "The password must be 1 to 1024 characters."),
    ],
)
def test_a_login_is_refused_with_the_message_for_its_first_problem(body: object, message: str) -> None:
    assert refusal(LoginRequest.parse, body) == message


def errors_of(model: Any, body: object) -> int:
    with pytest.raises(ValidationError) as invalid:
        model.model_validate(body)
    return invalid.value.error_count()


def test_a_body_of_thousands_of_bad_items_costs_one_error_not_thousands() -> None:
    """What a client is told is one problem; collecting 20,000 of them took 80 ms of the event loop."""
    assert errors_of(ChatRequest, {"messages": [{}] * 20_000}) == 1
    with pytest.raises(ValidationError) as invalid:  # parts are judged where they are read
        PARTS.validate_python([{}] * 20_000)
    assert invalid.value.error_count() == 1
    assert errors_of(WorkflowInputs, {f"bad name {n}": n for n in range(20_000)}) == 1
    unknown = {"workflow": "tutor", **{f"x{n}": n for n in range(20_000)}}
    assert errors_of(TokenRequest, unknown) == 1
    assert refusal(TokenRequest.parse, unknown) == "Unknown field: 'x0'."


# Relay inputs: the shape is the model's, the policy the workflow's

TUTOR = Workflow(alias="tutor", id="wf_tutor", image_input="image_url", inputs=frozenset({"question", "image_url"}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (["question"], "The body must be a JSON object of input names to text values."),
        ({"bad name": "x"}, "'bad name' is not a valid input name."),
        ({"x" * 100: "x"}, f"{'x' * 64!r} is not a valid input name."),
        ({"question": 5}, "The input 'question' must be a string."),
        ({"question": None}, "The input 'question' must be a string."),
        ({"topic": "x"}, "The input 'topic' is not accepted by this workflow."),
        ({"question": "x" * 31}, "The input 'question' is longer than 30 characters."),
        ({"image_url": "http://x.example/a.png"}, "The input 'image_url' takes https: image URLs, one per line."),
    ],
)
def test_relay_inputs_are_refused_with_the_message_for_their_problem(body: object, message: str) -> None:
    assert refusal(lambda submitted: TUTOR.build_inputs(submitted, 30), body) == message


GRADED = Workflow(alias="graded", id="wf_graded", fixed={"grade": "5"}, inputs=frozenset({"question", "grade"}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"grade": 5}, "The input 'grade' is set by the server and cannot be changed."),
        ({"topic": 5}, "The input 'topic' is not accepted by this workflow."),
        ({"topic": None, "bad name": "x"}, "The input 'topic' is not accepted by this workflow."),
        ({"question": None, "": "x"}, "The input 'question' must be a string."),
        ({"question": "ok", "bad name": 5, "grade": "6"}, "'bad name' is not a valid input name."),
        ({"question": "x" * 31, "grade": 5}, "The input 'question' is longer than 30 characters."),
    ],
)
def test_relay_inputs_are_judged_one_by_one_in_order_name_before_value(body: object, message: str) -> None:
    """As in 0926b52: the first input with a problem is told, and the server's rules on its name (fixed,
    not accepted) before its value's type."""
    assert refusal(lambda submitted: GRADED.build_inputs(submitted, 30), body) == message


def test_the_input_model_alone_takes_any_well_formed_names_to_text() -> None:
    assert WorkflowInputs.parse({"topic": "maths", "_x": ""}).root == {"topic": "maths", "_x": ""}


# The useChat request: every message an object with a role, the rest judged on the messages read


def test_malformed_parts_and_attachments_are_refused_only_where_they_are_read() -> None:
    """As in 0926b52: a dropped system message, a turn cut off by an edit, the parts beside a v4
    `content` of an earlier turn, and earlier turns' attachments are not read, so not judged."""
    hi = {"role": "user", "content": "Hi"}
    unread = [
        {"messages": [{"role": "system", "parts": [{"text": "no type"}]}, hi]},
        {"messages": [{"role": "system", "parts": 5, "experimental_attachments": 5}, hi]},
        {"messages": [{**hi, "id": "u1"}, {"role": "assistant", "parts": "x"}], "messageId": "u1"},
        {"messages": [{"role": "assistant", "content": "Yes", "parts": [5]}, hi]},
        {"messages": [{"role": "assistant", "content": "Yes", "experimental_attachments": [5]}, hi]},
    ]
    for body in unread:
        assert parse_chat_request(body).text == "Hi"
    # Read, they are judged: the parts of the latest message even beside its `content` (its files are read).
    assert refusal(parse_chat_request, {"messages": [{**hi, "parts": [{"text": "no type"}]}]}) == BAD_PARTS
    assert refusal(parse_chat_request, {"messages": [{"role": "assistant", "parts": 5}, hi]}) == BAD_PARTS
    assert refusal(parse_chat_request, {"messages": [{**hi, "experimental_attachments": [5]}]}) == (
        '"experimental_attachments" must be a list of objects.'
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "Hi", "experimental_attachments": None}]},
        {"messages": [{"role": "user", "content": "Hi", "experimental_attachments": {}}]},
        {"messages": [{"role": "user", "content": None, "parts": [{"type": "text", "text": "Hi"}]}]},
        {"messages": [{"role": "user", "content": 5, "parts": [{"type": "text", "text": "Hi"}]}]},
        {"messages": [{"role": "user", "parts": [{"type": "text", "text": None}, {"type": "text", "text": "Hi"}]}]},
        {"messages": [{"role": "user", "parts": [{"type": "text", "text": "Hi", "mediaType": 5, "url": None}]}]},
        {"id": 5, "messageId": 7, "messages": [{"id": 9, "role": "user", "content": "Hi"}]},
        {"id": ["x"], "messageId": {}, "messages": [{"id": {}, "role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}], "message": 5},
        {"messages": [{"role": "user", "content": "Hi"}], "message": {"role": 5, "parts": "x"}},
    ],
    ids=[
        "null-attachments",
        "empty-object-attachments",
        "null-content-beside-parts",
        "number-content-beside-parts",
        "null-text",
        "text-part-with-a-number-media-type",
        "number-identifiers",
        "identifiers-of-other-kinds",
        "message-beside-messages",
        "malformed-message-beside-messages",
    ],
)
def test_what_0926b52_accepted_is_accepted(body: dict[str, Any]) -> None:
    """Values that were ignored are ignored again: null or other non-text where only text is used,
    identifiers that are no strings (no chat id, no edit), a `message` beside `messages`."""
    prompt = parse_chat_request(body)

    assert (prompt.text, prompt.history, prompt.images, prompt.chat_id) == ("Hi", [], [], None)


def test_number_identifiers_cut_nothing() -> None:
    body = {
        "messages": [{"id": 1, "role": "user", "content": "A"}, {"role": "user", "content": "B"}],
        "messageId": 1,
    }

    assert parse_chat_request(body).text == "B"


def test_a_chat_that_takes_no_images_says_so_whatever_the_attachment() -> None:
    """Said before advice on how to attach (https:, images only), which would only lead here."""
    for part in (
        {"type": "file", "mediaType": "image/png", "url": 5},
        {"type": "file", "mediaType": "image/png", "url": "http://x.example/a.png"},
        {"type": "file", "mediaType": None},
    ):
        body = {"messages": [{"role": "user", "parts": [part, {"type": "text", "text": "Hi"}]}]}
        assert refusal(lambda body: parse_chat_request(body, accepts_images=False), body) == NO_IMAGES


def test_a_message_without_a_role_is_told_first_whatever_else_is_wrong() -> None:
    """As in 0926b52: every message is checked for its role before anything else in the messages."""
    body = {"messages": [{"role": "user", "parts": [5]}, {"parts": []}], "trigger": "bogus"}

    assert refusal(parse_chat_request, body) == NO_ROLE
    assert refusal(parse_chat_request, {**body, "messages": body["messages"][:1]}) == (
        '"trigger" must be "submit-message" or "regenerate-message".'
    )
    assert refusal(parse_chat_request, {"message": {"role": None}, "trigger": "bogus"}) == NO_ROLE


def test_a_message_without_text_is_refused_only_where_it_is_read() -> None:
    body = {"messages": [{"role": "system"}, {"role": "user", "content": "Hi"}]}

    assert parse_chat_request(body).text == "Hi"
    assert refusal(parse_chat_request, {"messages": [{"role": "user"}]}) == (
        'Every message needs "parts" (AI SDK 5+) or "content" (AI SDK 3/4).'
    )


def test_a_request_without_messages_is_told_the_usage_whatever_else_is_wrong() -> None:
    assert refusal(parse_chat_request, {"trigger": "bogus", "messageId": 5}) == (
        'Send a useChat request: {"messages": [...]} or {"message": {...}}.'
    )


def test_null_identifiers_are_no_identifiers_and_extras_are_ignored() -> None:
    body = {"id": None, "messageId": None, "messages": [{"id": None, "role": "user", "content": "Hi"}], "data": 1}

    prompt = parse_chat_request(body)

    assert (prompt.text, prompt.chat_id) == ("Hi", None)
    assert parse_chat_request({**body, "id": "chat-1"}).chat_id == "chat-1"


def test_images_in_earlier_turns_are_not_judged() -> None:
    """An assistant may have sent an image as a data: URL; only the latest user message's are sent on."""
    drawn = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"}
    body = {
        "messages": [
            {"role": "assistant", "parts": [drawn]},
            {"role": "user", "parts": [{"type": "text", "text": "Hi"}]},
        ]
    }

    assert parse_chat_request(body, accepts_images=False).text == "Hi"


# The workflows file


def workflows_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "workflows.toml"
    path.write_text(text)
    with pytest.raises(WorkflowConfigError) as refused_with:
        parse_workflows("", path)
    return str(refused_with.value).removeprefix(f"BFF_WORKFLOWS_FILE: {path}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[workflow.tutor]\nid = "wf_1"\n', ", line 1: unknown table or key 'workflow' (did you mean [workflows.…]?)"),
        ("workflows = 5\n", ", line 1: workflows must be a table of tables, as in [workflows.tutor]"),
        ('[workflows]\ntutor = "wf_1"\n', ": [workflows.tutor] must be a table"),
        ('[workflows.tutor]\nid = "wf_1"\nb = 1\na = 2\n', ", line 1: [workflows.tutor] has unknown keys: a, b"),
        (
            '[workflows.tutor]\nid = "wf_1"\ninputs = "q"\n',
            ", line 1: [workflows.tutor] inputs must be a list of names",
        ),
        (
            '[workflows.tutor]\nid = "wf_1"\nfixed = { a = 1 }\n',
            ", line 1: [workflows.tutor] fixed must map names to strings",
        ),
        ('[workflows.tutor]\nid = "wf_1"\nrate_limit = 5\n', ", line 1: [workflows.tutor] rate_limit must be a string"),
        ("[workflows.-x]\n", ", line 1: workflow '-x': the alias may use letters, digits, '_' and '-'"),
        ("[workflows.tutor]\n", ", line 1: workflow 'tutor': the id must look like wf_abc123"),
        (
            '[workflows.tutor]\nid = "wf_1"\nchat_input = "a b"\n',
            ", line 1: workflow 'tutor': 'a b' is not a valid input name",
        ),
        (
            '[workflows.ok]\nid = "wf_1"\n[workflows.tutor]\nid = "wf_2"\nhistory_input = "message"\n',
            ", line 3: workflow 'tutor': chat_input, history_input and image_input must be different inputs, "
            "and none of them fixed",
        ),
    ],
)
def test_a_workflows_file_is_refused_naming_the_line_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    assert workflows_file(tmp_path, text).startswith(message)


def test_a_workflows_file_is_read_into_workflows(tmp_path: Path) -> None:
    path = tmp_path / "workflows.toml"
    path.write_text(
        '[workflows.tutor]\nid = 123\nchat_input = "question"\ninputs = ["question"]\nfixed = { grade = "5" }\n'
    )

    registry = parse_workflows("story=wf_story", path)
    assert registry.aliases() == ["story", "tutor"]
    tutor = registry.get("tutor")
    assert (tutor.id, tutor.chat_input, tutor.inputs, dict(tutor.fixed)) == (
        "123",
        "question",
        frozenset({"question"}),
        {"grade": "5"},
    )


# The document is made of the same models


def document() -> dict[str, Any]:
    async def endpoint(request: Request) -> Response:  # never called: only the routing table is read
        raise AssertionError

    routes = [Route(path, endpoint, methods=[method.upper()]) for method, path in OPERATIONS]
    return build_openapi(routes, ["tutor"])


def test_each_request_body_is_described_by_the_model_that_validates_it() -> None:
    schemas = document()["components"]["schemas"]
    bodies = {operation.body for operation in OPERATIONS.values() if operation.body is not None}

    assert {model.__name__ for model in bodies} == {"ChatRequest", "LoginRequest", "TokenRequest", "WorkflowInputs"}
    for model in bodies - {TokenRequest}:  # the token request's workflow is narrowed to the aliases
        own = model.model_json_schema(ref_template="#/components/schemas/{model}", schema_generator=UntitledFields)
        own.pop("$defs", None)
        assert schemas[model.__name__] == own
    assert schemas["ChatRequest"]["properties"]["messages"]["minItems"] == 1
    assert schemas["TokenRequest"]["additionalProperties"] is False
    assert "additionalProperties" not in schemas["ChatRequest"]  # useChat `body` extras are ignored


def test_every_reference_in_the_document_resolves() -> None:
    spec = document()
    names = set(spec["components"]["schemas"])

    def refs(value: object) -> list[str]:
        if isinstance(value, dict):
            found = [value["$ref"]] if "$ref" in value else []
            return found + [ref for item in value.values() for ref in refs(item)]
        if isinstance(value, list):
            return [ref for item in value for ref in refs(item)]
        return []

    assert {ref.removeprefix("#/components/schemas/") for ref in refs(spec)} <= names


def test_the_token_request_names_the_configured_workflows() -> None:
    assert document()["components"]["schemas"]["TokenRequest"]["properties"]["workflow"] == {
        "type": "string",
        "enum": ["tutor"],
    }


def test_the_route_serving_the_document_is_get_only() -> None:
    assert openapi_route().methods == {"GET", "HEAD"}
