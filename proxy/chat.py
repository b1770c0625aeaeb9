"""useChat requests (CONTRACT B3) turned into workflow inputs.

Three request shapes arrive at `/api/chat/{alias}`: AI SDK 5+ `{"id", "messages": [{"role", "parts"}],
"trigger", "messageId"?}`, the single-message form `{"id", "message": {...}}` that apps send when they
keep the history on their server, and AI SDK 3/4 `{"messages": [{"role", "content"}]}`. All three are
one model, `ChatRequest` (also what /openapi.json describes): every message must be an object with a
role, and the messages read (not a dropped system message, say) must be well formed. It is read into
a `Prompt` (the latest user message, the earlier turns, the attached image URLs), which the workflow's
`chat_input`, `history_input` and `image_input` settings then map to upstream inputs.

Anything else in the body (useChat `body` extras, v4 `data`) is ignored: the browser never chooses
inputs on this route beyond the conversation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired, TypeVar

from pydantic import (
    MISSING,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12

from proxy.errors import INVALID_INPUT
from proxy.models import FAIL_FAST, STRICT, BodyModel, Refusals, refused
from proxy.workflows import Workflow, is_https_url

ItemT = TypeVar("ItemT")
Role = Literal["user", "assistant"]
Trigger = Literal["submit-message", "regenerate-message"]
SUBMIT: Trigger = "submit-message"
REGENERATE: Trigger = "regenerate-message"
MAX_IMAGE_URL_CHARS = 2048
NO_IMAGES = "This chat does not accept images."
USAGE = 'Send a useChat request: {"messages": [...]} or {"message": {...}}.'
NO_TEXT = 'Every message needs "parts" (AI SDK 5+) or "content" (AI SDK 3/4).'
BAD_PARTS = 'A message\'s "parts" must be a list of objects with a "type".'
ONLY_IMAGES = "Only images can be attached."
HTTPS_IMAGES = "Attach images as https: URLs."
BAD_ATTACHMENTS = '"experimental_attachments" must be a list of objects.'
NO_ROLE = 'Every message must be an object with a "role".'
# The transcript format of `history_input`: one paragraph per turn, oldest first.
SPEAKERS: dict[Role, str] = {"user": "User", "assistant": "Assistant"}


# A long chat is thousands of messages and parts, so these are TypedDicts, validated into plain dicts:
# a model instance each made validating three times slower, and its extra objects brought the garbage
# collector's full passes into reading one request (tests/test_chat_cost.py).
#
# The request model judges what every message must be, an object with a role, and the request's own
# fields. A message's parts and attachments are judged where they are read (`parts_of`, `image_urls`),
# so a malformed part in a turn that is not read (a system message, one cut off by an edit) is no
# error, as it never was. Fields used only when they are strings (a part's `text`, a v4 `content`,
# the identifiers) take any value, and other values are ignored.


def _ignored_unless_text(value: object) -> str | None:
    return value if isinstance(value, str) else None


# An identifier: a string, or anything else taken for none (null is what clients send for "none yet").
Identifier = Annotated[str | None, BeforeValidator(_ignored_unless_text)]
# Judged where it is used, if at all: any value passes the model (the document shows a string).
AnyText = Annotated[Any, WithJsonSchema({"type": "string"})]


@with_config(STRICT)
class ChatPart(TypedDict):
    """One part of an AI SDK 5+ message. `text` parts carry the text, `file` parts with an image/*
    media type an https: image URL; the others (reasoning, tools, sources, steps) are read past."""

    type: str
    text: NotRequired[AnyText]  # not a string: no text
    mediaType: NotRequired[AnyText]  # judged on file parts only
    url: NotRequired[AnyText]  # judged on file parts only


@with_config(STRICT)
class Attachment(TypedDict):
    """An AI SDK 4 `experimental_attachments` entry."""

    contentType: NotRequired[AnyText]
    url: NotRequired[AnyText]


Parts = Annotated[list[ChatPart], FAIL_FAST]
# Left out, null or empty (anything JSON calls false) is no attachment.
Attachments = Annotated[list[Attachment], FAIL_FAST, BeforeValidator(lambda value: value or [])]
PARTS: TypeAdapter[list[ChatPart]] = TypeAdapter(Parts)
ATTACHMENTS: TypeAdapter[list[Attachment]] = TypeAdapter(Attachments)


def _read_when_used(shape: object) -> PlainValidator:
    """Any value passes; the document shows `shape`, which the value is held to where it is read."""
    return PlainValidator(lambda value: value, json_schema_input_type=shape)


@with_config(STRICT)
class ChatMessage(TypedDict):
    """A message of the conversation: AI SDK 5+ `parts`, or AI SDK 3/4 `content` (its whole text).
    Roles other than user and assistant are dropped: a system message from a browser is no
    instruction of ours."""

    id: NotRequired[Identifier]
    role: str
    parts: NotRequired[Annotated[Any, _read_when_used(Parts)]]
    content: NotRequired[AnyText]  # not a string: the parts are the text
    experimental_attachments: NotRequired[Annotated[Any, _read_when_used(Attachments)]]


def _read(adapter: TypeAdapter[list[ItemT]], value: object, problem: str) -> list[ItemT]:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        raise INVALID_INPUT.error(problem) from None


def parts_of(message: ChatMessage) -> list[ChatPart]:
    """A message's parts, judged; a message without them needs its text in `content`."""
    if "parts" in message:
        return _read(PARTS, message["parts"], BAD_PARTS)
    if not isinstance(message.get("content"), str):
        raise INVALID_INPUT.error(NO_TEXT)
    return []


def message_text(message: ChatMessage, parts: list[ChatPart] | None = None) -> str:
    """A message's text. Its parts are judged only when they are its text, unless given already judged."""
    content = message.get("content")
    if isinstance(content, str):  # AI SDK 3/4: `content` is the message's whole text
        return content
    if parts is None:
        parts = parts_of(message)
    texts = [part.get("text") for part in parts if part["type"] == "text"]
    return "\n\n".join(text for text in texts if isinstance(text, str))


def image_urls(message: ChatMessage, parts: list[ChatPart], *, accepted: bool) -> list[str]:
    """Image URLs from AI SDK 5+ `file` parts and AI SDK 4 `experimental_attachments`."""
    files = [(part.get("mediaType"), part.get("url")) for part in parts if part["type"] == "file"]
    attachments = _read(ATTACHMENTS, message.get("experimental_attachments"), BAD_ATTACHMENTS)
    files += [(item.get("contentType"), item.get("url")) for item in attachments]
    if files and not accepted:  # said first: advice on how to attach would only lead here
        raise INVALID_INPUT.error(NO_IMAGES)
    urls = []
    for media_type, url in files:
        if not isinstance(media_type, str) or not media_type.startswith("image/"):
            raise INVALID_INPUT.error(ONLY_IMAGES)
        if not isinstance(url, str) or len(url) > MAX_IMAGE_URL_CHARS or not is_https_url(url):
            # The workflow fetches images itself; data: URLs would also put megabytes into a text input.
            raise INVALID_INPUT.error(HTTPS_IMAGES)
        urls.append(url)
    return urls


class ChatRequest(BodyModel):
    """A Vercel AI SDK useChat request: v5+ {id, messages[parts], trigger, messageId?}, the single-message
    form {id, message}, or v3/v4 {messages[{role, content}]}. Other fields are ignored, and so is
    `message` beside `messages`."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["messages"]}, {"required": ["message"]}]})
    id: Identifier = None
    messages: Annotated[list[ChatMessage], Field(min_length=1), FAIL_FAST] | MISSING = MISSING
    message: ChatMessage | MISSING = MISSING
    trigger: Trigger = SUBMIT
    message_id: Identifier = Field(None, alias="messageId")

    refusals = Refusals(
        USAGE,
        {
            "messages.*": NO_ROLE,
            "messages": '"messages" must be a non-empty list.',
            "message": NO_ROLE,
            "trigger": f'"trigger" must be "{SUBMIT}" or "{REGENERATE}".',
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _has_messages(cls, body: object) -> object:
        # Before the fields: a body without a conversation is told so, whatever else is wrong with it.
        if isinstance(body, dict) and "messages" not in body and "message" not in body:
            raise refused(USAGE)
        if isinstance(body, dict) and "messages" in body and "message" in body:
            return {key: value for key, value in body.items() if key != "message"}  # not read: not judged
        return body


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class Prompt:
    """What one chat request asks of the workflow."""

    text: str  # the latest user message
    history: list[Turn]  # the turns before it, oldest first
    images: list[str]  # https: URLs of the images attached to the latest user message
    chat_id: str | None = None  # the chat's id, which its run is found by


def parse_chat_request(body: object, *, accepts_images: bool = True) -> Prompt:
    """Read any of the three useChat request shapes; raises `INVALID_INPUT` (422) for anything else, and for
    any attachment unless the workflow `accepts_images`."""
    request = ChatRequest.parse(body)
    if request.messages is not MISSING:
        messages = request.messages
    else:
        assert request.message is not MISSING  # the model refuses a request with neither
        messages = [request.message]
    messages = _cut_for_trigger(messages, request.trigger, request.message_id)
    # System messages are dropped: a workflow's instructions are configured upstream, and a browser
    # must not be able to present its own text as the system's. Other roles (v4 "data", tool
    # results) carry nothing a text workflow can use.
    conversation = [message for message in messages if message["role"] in SPEAKERS]
    if not conversation or conversation[-1]["role"] != "user":
        raise INVALID_INPUT.error("The last message must be the user's.")
    latest = conversation[-1]
    parts = parts_of(latest)  # judged even beside a `content`: its files are read
    text = message_text(latest, parts)
    images = image_urls(latest, parts, accepted=accepts_images)
    if not text.strip() and not images:
        raise INVALID_INPUT.error("The message is empty.")
    history = [Turn(_role(message), message_text(message)) for message in conversation[:-1]]
    return Prompt(
        text=text,
        history=[turn for turn in history if turn.text.strip()],
        images=images,
        chat_id=request.id,
    )


def chat_inputs(prompt: Prompt, workflow: Workflow, max_chars: int) -> dict[str, str]:
    """The upstream inputs for one chat turn, by the workflow's settings; fixed inputs always win."""
    if len(prompt.text) > max_chars:
        raise INVALID_INPUT.error(f"The message is longer than {max_chars} characters.")
    inputs = {workflow.chat_input: prompt.text}
    if workflow.history_input is not None:
        # Always sent, empty on the first turn, so a prompt template never sees an unset variable.
        inputs[workflow.history_input] = transcript(prompt.history, max_chars)
    if prompt.images:
        if workflow.image_input is None:
            raise INVALID_INPUT.error(NO_IMAGES)
        urls = "\n".join(prompt.images)
        if len(urls) > max_chars:
            raise INVALID_INPUT.error("Too many images in one message.")
        inputs[workflow.image_input] = urls
    return {**inputs, **workflow.fixed}


def transcript(history: list[Turn], max_chars: int) -> str:
    """Earlier turns as plain text, the oldest dropped first to stay within `max_chars`.

    A long chat must keep working: the latest turns matter most, so the transcript is cut from the
    start rather than the request refused.
    """
    kept: list[str] = []
    used = 0
    for turn in reversed(history):
        paragraph = f"{SPEAKERS[turn.role]}: {turn.text}"
        cost = len(paragraph) + (2 if kept else 0)
        if used + cost > max_chars:
            if not kept:  # even the latest earlier turn is too long: keep its end
                kept.append(paragraph[-max_chars:])
            break
        kept.append(paragraph)
        used += cost
    return "\n\n".join(reversed(kept))


def _cut_for_trigger(messages: list[ChatMessage], trigger: str, message_id: str | None) -> list[ChatMessage]:
    """The history as the client means it, also from clients that did not cut it themselves.

    AI SDK 5+ sends the history already cut: after the edited user message on an edit
    (`submit-message` with its `messageId`), and without the assistant message being replaced on a
    regenerate. A regenerate therefore re-runs the latest user message with the turns before it.
    """
    index = next((i for i, m in enumerate(messages) if message_id is not None and m.get("id") == message_id), None)
    if trigger == SUBMIT and index is not None and messages[index]["role"] == "user":
        return messages[: index + 1]
    if trigger == REGENERATE:
        end = index if index is not None and messages[index]["role"] == "assistant" else len(messages)
        # One cut at the end, not one copy of the list per trailing answer: linear in the body.
        while end and messages[end - 1]["role"] == "assistant":
            end -= 1
        messages = messages[:end]
    return messages


def _role(message: ChatMessage) -> Role:
    return "user" if message["role"] == "user" else "assistant"
