"""The emulated upstream behaves like CONTRACT Part A, so what the proxy is tested against is faithful."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from tests.servers import TEST_API_KEY, EmulatorControl

KEY = {"Authorization": f"Bearer {TEST_API_KEY}"}


def mint(upstream: EmulatorControl, **params: object) -> httpx.Response:
    return httpx.get(f"{upstream.url}/api/v1/token", params=params, headers=KEY)


def test_a_mint_returns_a_token_with_rate_limit_headers(upstream: EmulatorControl) -> None:
    response = mint(upstream)

    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["ttl"] == 60 and body["token"].startswith("pub_tok_")
    assert int(response.headers["x-ratelimit-remaining"]) < int(response.headers["x-ratelimit-limit"])


@pytest.mark.parametrize("ttl", ["0", "301", "abc"])
def test_a_ttl_out_of_range_is_a_400(upstream: EmulatorControl, ttl: str) -> None:
    assert mint(upstream, ttl=ttl).status_code == 400


@pytest.mark.parametrize("auth", [None, "Bearer sk_wrong", TEST_API_KEY])
def test_a_missing_or_wrong_key_is_a_401(upstream: EmulatorControl, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    response = httpx.get(f"{upstream.url}/api/v1/token", headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_token_expires_after_its_ttl(upstream: EmulatorControl) -> None:
    token = mint(upstream, ttl=1).json()["token"]
    time.sleep(1.1)  # letting the TTL pass is the behaviour under test, not synchronisation

    response = httpx.post(f"{upstream.url}/api/v1/run/wf_x/stream", params={"token": token}, json={"a": "b"})

    assert response.status_code == 401


def test_a_stream_arrives_as_word_sized_text_chunks(upstream: EmulatorControl) -> None:
    token = mint(upstream).json()["token"]
    url = f"{upstream.url}/api/v1/run/wf_x/stream"

    with httpx.stream("POST", url, params={"token": token}, json={"topic": "owls"}) as response:
        chunks = [chunk.decode() for chunk in response.iter_raw()]

    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert "".join(chunks) == generate_text("wf_x", {"topic": "owls"})
    assert len(chunks) == len(split_chunks("".join(chunks)))


@pytest.mark.parametrize(
    "question",
    [
        "Explain fractions to a 10 year old",
        "Why is the sky blue?",
        "how do volcanoes erupt",
        "café ✓ 数学",
        "?!",
        "",
        "x" * 200,
    ],
)
def test_an_answer_reads_like_a_tutor_whatever_the_question(question: str) -> None:
    text = generate_text("wf_tutor", {"message": question})

    assert text == generate_text("wf_tutor", {"message": question})  # deterministic: tests compute it
    assert 3 <= len(re.findall(r"[.!?](?= |$)", text)) <= 6  # a few whole sentences
    assert text[0].isupper() and text[-1] in ".!?"
    assert all(chunk.strip() for chunk in split_chunks(text))  # word-sized, never empty
    assert "{" not in text and "Let's work through" not in text
    if len(question) > 3:
        assert question not in text  # never pasted in raw: the text stays grammatical whatever was asked


def test_an_answer_names_the_questions_key_word_and_kind_and_varies_with_it() -> None:
    fractions = generate_text("wf_tutor", {"message": "Explain fractions to a 10 year old"})
    why = generate_text("wf_tutor", {"message": "Why do volcanoes erupt?"})
    answers = {generate_text("wf_tutor", {"message": f"question {n}"}) for n in range(20)}

    assert "“fractions”" in fractions and "Explain" not in fractions
    assert "“volcanoes”" in why and "A “why” question" in why
    assert len({answer.split(". ")[0] for answer in answers}) > 1  # several openings, picked by a hash


def test_faults_answer_with_either_error_body_shape_or_not_json(upstream: EmulatorControl) -> None:
    upstream.fault(op="run", status=402, shape="flat")
    upstream.fault(op="run", status=404, shape="nested")
    upstream.fault(op="run", status=500, shape="text")
    url = f"{upstream.url}/api/v1/run/wf_x"

    flat, nested, text = (httpx.post(url, json={"a": "b"}, headers=KEY) for _ in range(3))

    assert flat.status_code == 402 and isinstance(flat.json()["error"], str)
    assert nested.status_code == 404 and nested.json()["error"]["code"] == "workflow_not_found"
    assert text.status_code == 500 and text.headers["content-type"].startswith("text/html")
    assert httpx.post(url, json={"a": "b"}, headers=KEY).json()["citations"]


def test_the_emulator_records_what_it_received(upstream: EmulatorControl) -> None:
    mint(upstream, ttl=5)

    [request] = upstream.requests("mint")

    assert request["query"] == {"ttl": "5"}
    assert request["headers"]["authorization"] == KEY["Authorization"]
