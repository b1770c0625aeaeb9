"""useChat requests (CONTRACT B3) turned into workflow inputs.

Three request shapes arrive at `/api/chat/{alias}`: AI SDK 5+ `{"id", "messages": [{"role", "parts"}],
"trigger", "messageId"?}`, the single-message form `{"id", "message": {...}}` that apps send when they
keep the history on their server, and AI SDK 3/4 `{"messages": [{"role", "content"}]}`. All three are
one model, `ChatRequest` (also what /openapi.json describes), whose every message must be well formed.
It is read into a `Prompt` (the latest user message, the earlier turns, the attached image URLs), which
the workflow's `chat_input`, `history_input` and `image_input` settings then map to upstream inputs.

Anything else in the body (useChat `body` extras, v4 `data`) is ignored: the browser never chooses
inputs on this route beyond the conversation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, NotRequired

from pydantic import MISSING, ConfigDict, Field, model_validator, with_config
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12

from proxy.errors import INVALID_INPUT
from proxy.models import FAIL_FAST, STRICT, BodyModel, Refusals, refused
from proxy.workflows import Workflow, is_https_url

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
# The transcript format of `history_input`: one paragraph per turn, oldest first.
SPEAKERS: dict[Role, str] = {"user": "User", "assistant": "Assistant"}


# A long chat is thousands of messages and parts, so these are TypedDicts, validated into plain dicts:
# a model instance each made validating three times slower, and its extra objects brought the garbage
# collector's full passes into reading one request (tests/test_chat_cost.py).


@with_config(STRICT)
class ChatPart(TypedDict):
    """One part of an AI SDK 5+ message. `text` parts carry the text, `file` parts with an image/*
    media type an https: image URL; the others (reasoning, tools, sources, steps) are read past."""

    type: str
    text: NotRequired[str]
    mediaType: NotRequired[str]
    url: NotRequired[str]


@with_config(STRICT)
class Attachment(TypedDict):
    """An AI SDK 4 `experimental_attachments` entry."""

    contentType: NotRequired[str]
    url: NotRequired[str]


@with_config(STRICT)
class ChatMessage(TypedDict):
    """A message of the conversation: AI SDK 5+ `parts`, or AI SDK 3/4 `content` (its whole text).
    Roles other than user and assistant are dropped: a system message from a browser is no
    instruction of ours."""

    id: NotRequired[str | None]
    role: str
    parts: NotRequired[Annotated[list[ChatPart], FAIL_FAST]]
    content: NotRequired[str]
    experimental_attachments: NotRequired[Annotated[list[Attachment], FAIL_FAST]]


def message_text(message: ChatMessage) -> str:
    if "content" in message:  # AI SDK 3/4: `content` is the message's whole text
        return message["content"]
    # Checked here, on the messages read, not by the model: a system message with neither is dropped
    # unread, so it is no error.
    if "parts" not in message:
        raise INVALID_INPUT.error(NO_TEXT)
    return "\n\n".join(part["text"] for part in message["parts"] if part["type"] == "text" and "text" in part)


def image_urls(message: ChatMessage, *, accepted: bool) -> list[str]:
    """Image URLs from AI SDK 5+ `file` parts and AI SDK 4 `experimental_attachments`."""
    files = [(part.get("mediaType"), part.get("url")) for part in message.get("parts", ()) if part["type"] == "file"]
    files += [(item.get("contentType"), item.get("url")) for item in message.get("experimental_attachments", ())]
    if files and not accepted:  # said first: advice on how to attach would only lead here
        raise INVALID_INPUT.error(NO_IMAGES)
    urls = []
    for media_type, url in files:
        if media_type is None or not media_type.startswith("image/"):
            raise INVALID_INPUT.error(ONLY_IMAGES)
        if url is None or len(url) > MAX_IMAGE_URL_CHARS or not is_https_url(url):
            # The workflow fetches images itself; data: URLs would also put megabytes into a text input.
            raise INVALID_INPUT.error(HTTPS_IMAGES)
        urls.append(url)
    return urls


class ChatRequest(BodyModel):
    """A Vercel AI SDK useChat request: v5+ {id, messages[parts], trigger, messageId?}, the single-message
    form {id, message}, or v3/v4 {messages[{role, content}]}. Other fields are ignored."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["messages"]}, {"required": ["message"]}]})
    id: str | None = None  # identifiers may be null: some clients send one for "none yet"
    messages: Annotated[list[ChatMessage], Field(min_length=1), FAIL_FAST] | MISSING = MISSING
    message: ChatMessage | MISSING = MISSING
    trigger: Trigger = SUBMIT
    message_id: str | None = Field(None, alias="messageId")

    refusals = Refusals(
        USAGE,
        {
            "messages": '"messages" must be a non-empty list.',
            "messages.*": 'Every message must be an object with a "role".',
            "messages.*.role": 'Every message must be an object with a "role".',
            "message": 'Every message must be an object with a "role".',
            "message.role": 'Every message must be an object with a "role".',
            "trigger": f'"trigger" must be "{SUBMIT}" or "{REGENERATE}".',
            "*.**.text": 'A part\'s "text" must be a string.',
            "*.**.mediaType": ONLY_IMAGES,
            "*.**.contentType": ONLY_IMAGES,
            "*.**.url": HTTPS_IMAGES,
            "*.**.parts.**": BAD_PARTS,
            "*.**.content": NO_TEXT,
            "*.**.experimental_attachments.**": '"experimental_attachments" must be a list of objects.',
            "*.**.id": 'A message\'s "id" must be a string.',
            "id": '"id" must be a string.',
            "messageId": '"messageId" must be a string.',
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _has_messages(cls, body: object) -> object:
        # Before the fields: a body without a conversation is told so, whatever else is wrong with it.
        if isinstance(body, dict) and "messages" not in body and "message" not in body:
            raise refused(USAGE)
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
    text = message_text(latest)
    images = image_urls(latest, accepted=accepts_images)
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
