"""useChat requests (CONTRACT B3) turned into workflow inputs.

Three request shapes arrive at `/api/chat/{alias}`: AI SDK 5+ `{"id", "messages": [{"role", "parts"}],
"trigger", "messageId"?}`, the single-message form `{"id", "message": {...}}` that apps send when they
keep the history on their server, and AI SDK 3/4 `{"messages": [{"role", "content"}]}`. Each is read
into one `ChatRequest` (the latest user message, the earlier turns, the attached image URLs), which the
workflow's `chat_input`, `history_input` and `image_input` settings then map to upstream inputs.

Anything else in the body (useChat `body` extras, v4 `data`) is ignored: the browser never chooses
inputs on this route beyond the conversation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxy.errors import invalid_input
from proxy.workflows import Workflow, is_https_url

Role = Literal["user", "assistant"]
SUBMIT = "submit-message"
REGENERATE = "regenerate-message"
MAX_IMAGE_URL_CHARS = 2048
NO_IMAGES = "This chat does not accept images."
# The transcript format of `history_input`: one paragraph per turn, oldest first.
SPEAKERS: dict[Role, str] = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class ChatRequest:
    text: str  # the latest user message
    history: list[Turn]  # the turns before it, oldest first
    images: list[str]  # https: URLs of the images attached to the latest user message


def parse_chat_request(body: object, *, accepts_images: bool = True) -> ChatRequest:
    """Read any of the three useChat request shapes; raises ApiError(422) for anything else, and for
    any attachment unless the workflow `accepts_images`."""
    if not isinstance(body, dict):
        raise invalid_input('Send a useChat request: {"messages": [...]} or {"message": {...}}.')
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise invalid_input('"messages" must be a non-empty list.')
    elif "message" in body:
        messages = [body["message"]]
    else:
        raise invalid_input('Send a useChat request: {"messages": [...]} or {"message": {...}}.')
    if not all(isinstance(message, dict) and isinstance(message.get("role"), str) for message in messages):
        raise invalid_input('Every message must be an object with a "role".')
    trigger = body.get("trigger", SUBMIT)
    if trigger not in (SUBMIT, REGENERATE):
        raise invalid_input(f'"trigger" must be "{SUBMIT}" or "{REGENERATE}".')
    message_id = body.get("messageId")

    messages = _cut_for_trigger(messages, trigger, message_id if isinstance(message_id, str) else None)
    # System messages are dropped: a workflow's instructions are configured upstream, and a browser
    # must not be able to present its own text as the system's. Other roles (v4 "data", tool
    # results) carry nothing a text workflow can use.
    conversation = [message for message in messages if message["role"] in SPEAKERS]
    if not conversation or conversation[-1]["role"] != "user":
        raise invalid_input("The last message must be the user's.")
    latest = conversation[-1]
    text = _text_of(latest)
    images = _images_of(latest, accepted=accepts_images)
    if not text.strip() and not images:
        raise invalid_input("The message is empty.")
    history = [Turn(_role(message), _text_of(message)) for message in conversation[:-1]]
    return ChatRequest(text=text, history=[turn for turn in history if turn.text.strip()], images=images)


def chat_inputs(chat: ChatRequest, workflow: Workflow, max_chars: int) -> dict[str, str]:
    """The upstream inputs for one chat turn, by the workflow's settings; fixed inputs always win."""
    if len(chat.text) > max_chars:
        raise invalid_input(f"The message is longer than {max_chars} characters.")
    inputs = {workflow.chat_input: chat.text}
    if workflow.history_input is not None:
        # Always sent, empty on the first turn, so a prompt template never sees an unset variable.
        inputs[workflow.history_input] = transcript(chat.history, max_chars)
    if chat.images:
        if workflow.image_input is None:
            raise invalid_input(NO_IMAGES)
        urls = "\n".join(chat.images)
        if len(urls) > max_chars:
            raise invalid_input("Too many images in one message.")
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


def _cut_for_trigger(
    messages: list[dict[str, object]], trigger: str, message_id: str | None
) -> list[dict[str, object]]:
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


def _role(message: dict[str, object]) -> Role:
    return "user" if message["role"] == "user" else "assistant"


def _text_of(message: dict[str, object]) -> str:
    content = message.get("content")
    if isinstance(content, str):  # AI SDK 3/4: `content` is the message's whole text
        return content
    parts = _parts_of(message)
    texts = [part.get("text") for part in parts if part["type"] == "text"]
    return "\n\n".join(text for text in texts if isinstance(text, str))


def _parts_of(message: dict[str, object]) -> list[dict[str, object]]:
    if "parts" not in message:
        if isinstance(message.get("content"), str):
            return []
        raise invalid_input('Every message needs "parts" (AI SDK 5+) or "content" (AI SDK 3/4).')
    parts = message["parts"]
    if not isinstance(parts, list) or not all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in parts
    ):
        raise invalid_input('A message\'s "parts" must be a list of objects with a "type".')
    return parts


def _images_of(message: dict[str, object], *, accepted: bool) -> list[str]:
    """Image URLs from AI SDK 5+ `file` parts and AI SDK 4 `experimental_attachments`."""
    files: list[tuple[object, object]] = [
        (part.get("mediaType"), part.get("url")) for part in _parts_of(message) if part["type"] == "file"
    ]
    attachments = message.get("experimental_attachments") or []
    if not isinstance(attachments, list) or not all(isinstance(item, dict) for item in attachments):
        raise invalid_input('"experimental_attachments" must be a list of objects.')
    files += [(item.get("contentType"), item.get("url")) for item in attachments]
    if files and not accepted:  # said first: advice on how to attach would only lead here
        raise invalid_input(NO_IMAGES)
    urls = []
    for media_type, url in files:
        if not isinstance(media_type, str) or not media_type.startswith("image/"):
            raise invalid_input("Only images can be attached.")
        if not isinstance(url, str) or len(url) > MAX_IMAGE_URL_CHARS or not is_https_url(url):
            # The workflow fetches images itself; data: URLs would also put megabytes into a text input.
            raise invalid_input("Attach images as https: URLs.")
        urls.append(url)
    return urls
