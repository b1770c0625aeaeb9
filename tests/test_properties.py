"""Properties of the two input gates, over generated input (hypothesis): the useChat request parser
(proxy/chat.py) and the workflow input validator (`Workflow.build_inputs`, proxy/workflows.py).

Whatever a browser sends, each gate either refuses it with a 422 `ApiError`, or lets through only
strings within the limits, under the names the workflow allows, with the server's fixed inputs
untouchable. Nothing else may escape: any other exception would be a 500.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.chat import (
    MAX_IMAGE_URL_CHARS,
    REGENERATE,
    SPEAKERS,
    SUBMIT,
    Turn,
    chat_inputs,
    parse_chat_request,
    transcript,
)
from proxy.errors import ApiError
from proxy.json_text import loads_text
from proxy.workflows import INPUT_NAME_PATTERN, Workflow, is_https_url

# A few hundred cases each in `make test`; `make fuzz` asks for many more.
EXAMPLES = settings(
    max_examples=int(os.environ.get("BFF_PROPERTY_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TUTOR = Workflow(
    alias="tutor",
    id="wf_tutor",
    chat_input="question",
    history_input="history",
    image_input="image_url",
    inputs=frozenset({"question", "topic", "image_url"}),
    fixed={"grade": "5"},
)
OPEN = Workflow(alias="open", id="wf_open")  # any well-formed input name
WORKFLOWS = st.sampled_from([TUTOR, OPEN])

# Any JSON document at all.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
URLS = st.sampled_from(
    [
        "https://example.org/cat.png",
        "https://example.org/" + "a" * MAX_IMAGE_URL_CHARS,
        "http://example.org/cat.png",
        "https:///no-host.png",
        "https://exa mple.org/x.png",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "https://example.org/a.png\nhttps://evil.example/b.png",
    ]
) | st.text(max_size=30)
TEXT = st.text(max_size=60) | st.sampled_from(["", "   ", "\n\n"])

# Requests shaped like useChat's, right and wrong in every field the parser reads.
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "file", "reasoning", "step-start"]) | st.text(max_size=6)},
    optional={
        "text": TEXT | JSON,
        "mediaType": st.sampled_from(["image/png", "image/webp", "text/plain", "application/pdf"]) | JSON,
        "url": URLS | JSON,
    },
)
ATTACHMENT = st.fixed_dictionaries(
    {}, optional={"contentType": st.sampled_from(["image/png", "text/plain"]), "url": URLS}
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "data", "tool"]) | st.text(max_size=6)},
    optional={
        "id": st.sampled_from(["m1", "m2", "m3"]),
        "parts": st.lists(PART, max_size=4) | JSON,
        "content": TEXT | JSON,
        "experimental_attachments": st.lists(ATTACHMENT, max_size=2) | JSON,
    },
)
CHAT = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8),
        "messages": st.lists(MESSAGE | JSON, max_size=5) | JSON,
        "message": MESSAGE | JSON,
        "trigger": st.sampled_from([SUBMIT, REGENERATE]) | st.text(max_size=8),
        "messageId": st.sampled_from(["m1", "m2", "m3"]) | JSON,
    },
)
NAMES = st.sampled_from(["question", "topic", "image_url", "grade", "history", "_x", "x" * 64]) | st.text(max_size=70)
INPUTS = st.dictionaries(NAMES, TEXT | URLS | JSON, max_size=5) | JSON


def refused(error: ApiError) -> None:
    assert (error.status, error.code) == (422, "invalid_input")
    assert error.message and len(error.message) < 300


# The useChat parser


@EXAMPLES
@given(body=CHAT | JSON)
def test_the_chat_parser_reads_a_request_or_refuses_it_with_a_422(body: Any) -> None:
    try:
        chat = parse_chat_request(body)
    except ApiError as error:
        refused(error)
        return
    assert isinstance(chat.text, str)
    assert chat.text.strip() or chat.images, "an empty message is never sent upstream"
    for turn in chat.history:
        assert turn.role in SPEAKERS and isinstance(turn.text, str) and turn.text.strip()
    for url in chat.images:
        assert is_https_url(url) and len(url) <= MAX_IMAGE_URL_CHARS


@EXAMPLES
@given(body=CHAT, workflow=WORKFLOWS, max_chars=st.integers(min_value=1, max_value=200))
def test_chat_inputs_are_strings_within_the_limit_and_fixed_inputs_always_win(
    body: Any, workflow: Workflow, max_chars: int
) -> None:
    try:
        inputs = chat_inputs(parse_chat_request(body), workflow, max_chars)
    except ApiError as error:
        refused(error)
        return
    for name, value in inputs.items():
        assert isinstance(name, str) and isinstance(value, str)
        if name not in workflow.fixed:
            assert len(value) <= max_chars
    assert {name: inputs[name] for name in workflow.fixed} == dict(workflow.fixed)
    expected = {workflow.chat_input, *workflow.fixed}
    if workflow.history_input is not None:
        expected.add(workflow.history_input)
    assert set(inputs) - expected <= ({workflow.image_input} if workflow.image_input else set())


TURNS = st.lists(
    st.builds(Turn, role=st.sampled_from(list(SPEAKERS)), text=st.text(min_size=1, max_size=80)), max_size=8
)


@EXAMPLES
@given(history=TURNS, max_chars=st.integers(min_value=1, max_value=300))
def test_the_transcript_fits_the_limit_and_keeps_the_latest_turn(history: list[Turn], max_chars: int) -> None:
    text = transcript(history, max_chars)

    assert len(text) <= max_chars
    if history:
        latest = f"{SPEAKERS[history[-1].role]}: {history[-1].text}"
        assert text.endswith(latest[-max_chars:])


# The workflow input validator


@EXAMPLES
@given(submitted=INPUTS, workflow=WORKFLOWS, max_chars=st.integers(min_value=1, max_value=200))
def test_the_input_validator_lets_through_only_allowed_names_and_bounded_strings(
    submitted: Any, workflow: Workflow, max_chars: int
) -> None:
    try:
        inputs = workflow.build_inputs(submitted, max_chars)
    except ApiError as error:
        refused(error)
        return
    assert isinstance(submitted, dict)
    assert not set(submitted) & set(workflow.fixed), "a fixed input is never the browser's to set"
    assert {name: inputs[name] for name in workflow.fixed} == dict(workflow.fixed)
    for name, value in inputs.items():
        assert isinstance(value, str)
        if name in workflow.fixed:
            continue
        assert INPUT_NAME_PATTERN.fullmatch(name)
        assert workflow.inputs is None or name in workflow.inputs
        assert len(value) <= max_chars
        assert value == submitted[name]
        if name == workflow.image_input:
            assert all(is_https_url(url) for url in value.split("\n") if url)


@EXAMPLES
@given(value=st.text(max_size=30), name=st.sampled_from(["grade"]))
def test_a_fixed_input_is_refused_whatever_its_value(value: str, name: str) -> None:
    try:
        TUTOR.build_inputs({name: value}, 100)
    except ApiError as error:
        refused(error)
    else:
        raise AssertionError("a fixed input was accepted from the browser")


# JSON text


@EXAMPLES
@given(document=JSON)
def test_json_text_reads_back_exactly_what_was_written(document: Any) -> None:
    assert loads_text(json.dumps(document).encode()) == document


@EXAMPLES
@given(prefix=st.text(max_size=5), surrogate=st.integers(min_value=0xD800, max_value=0xDFFF))
def test_json_text_refuses_an_unpaired_surrogate(prefix: str, surrogate: int) -> None:
    escaped = '{"message": ' + json.dumps(prefix)[:-1] + f'\\u{surrogate:04x}"}}'
    encoded = '{"message": "' + chr(surrogate) + '"}'  # the surrogate's UTF-8 bytes, not an escape
    for document in (escaped.encode(), encoded.encode("utf-8", "surrogatepass")):
        with pytest.raises(ValueError):
            loads_text(document)


def test_json_text_nested_too_deeply_is_refused_not_a_crash() -> None:
    shallow: Any = loads_text(b"[" * 100 + b"]" * 100)  # nesting a person might write is fine
    for _ in range(99):
        (shallow,) = shallow
    assert shallow == []
    with pytest.raises(ValueError):  # not RecursionError, which would be a 500
        loads_text(b"[" * 100_000 + b"]" * 100_000)
