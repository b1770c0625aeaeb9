"""What crosses the boundary, as pydantic models: the one way a request body is validated, and the
bodies no other module owns (the token request, and the answers /openapi.json describes).

Every body a route reads is a model defined next to the rules it carries: the token request here,
the useChat request in proxy/chat.py, relay inputs (and the workflows file) in proxy/workflows.py,
the password sign-in in proxy/auth/password.py. proxy/openapi.py renders the same classes into the
document, so what is validated and what is described cannot drift apart. Rules a schema cannot say
(a URL must be https:, the last message must be the user's) are the models' own methods and
validators, next to their fields.

A refused body is a 422 `invalid_input` with a short message of ours, never pydantic's text: each model
lists, in `refusals`, what a client is told for each place its body can be wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import MISSING, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from proxy.errors import INVALID_INPUT

ModelT = TypeVar("ModelT", bound=BaseModel)
REFUSED = "refused"  # the error type of our own rules, whose message is already the client's
Message = str | Callable[[ErrorDetails], str]
STRICT = ConfigDict(strict=True)  # "5" is no number and 5 no string, as in JSON itself
# On every list and object of a body: validation stops at its first bad item. A client is told of one
# problem, and a body of 20,000 bad items would otherwise cost 20,000 errors, 80 ms where the first
# costs microseconds.
FAIL_FAST = Field(fail_fast=True)
IsoTime = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


def refused(message: str) -> PydanticCustomError:
    """A rule of ours failed: `message` is what the client is told, word for word."""
    # The message is passed as context, not as the template: a template's {braces} would be formatted.
    return PydanticCustomError(REFUSED, "{message}", {"message": message})


def message_of(error: ErrorDetails) -> str:
    """The message of an error: ours word for word, pydantic's (for code, not clients) otherwise."""
    return str(error.get("ctx", {})["message"]) if error["type"] == REFUSED else error["msg"]


class Refusals:
    """What a client is told for each place a body can be wrong, most important first: of the problems
    validation found, the client is told about the first one listed here, and of those at the same
    place, the first in the body (unknown fields in alphabetical order). Validation stops at the first
    bad item of a list or object (`FAIL_FAST`; in an object, at the next item's name at the latest),
    so the order here cannot put a problem of a later item before one of an earlier item: it ranks the
    problems of the body's separate fields, and those of one item.

    A place is a dotted path into the body, and takes the problems at it and anywhere below it: `*`
    stands for any one list index or object key, and `<unknown>` for a field the model does not know
    (`extra="forbid"`). A place ending in `:shape` takes only a missing field, an unknown one, or a
    value of the wrong JSON type; the place `:shape` alone, such problems anywhere.
    """

    def __init__(self, usage: str, places: Mapping[str, Message] | None = None) -> None:
        self.usage = usage  # for a body that is not even the right kind of JSON value
        self._places = [(*_place(place), message) for place, message in (places or {}).items()]

    def message(self, errors: list[ErrorDetails]) -> str:
        error = min(errors, key=lambda error: (self._rank(error), _unknown_name(error)))
        if error["type"] == REFUSED:
            return message_of(error)
        rank = self._rank(error)
        message = self._places[rank][2] if rank < len(self._places) else self.usage
        return message(error) if callable(message) else message

    def _rank(self, error: ErrorDetails) -> int:
        path, shape = _path(error), _is_shape(error)
        for rank, (place, shape_only, _) in enumerate(self._places):
            if (shape or not shape_only) and _matches(place, path):
                return rank
        return len(self._places)


def _place(place: str) -> tuple[list[str], bool]:
    path, _, kind = place.partition(":")
    return (path.split(".") if path else []), kind == "shape"


def _is_shape(error: ErrorDetails) -> bool:
    return error["type"] in ("missing", "extra_forbidden", "model_type") or error["type"].endswith("_type")


def _unknown_name(error: ErrorDetails) -> str:
    return str(error["loc"][-1]) if error["type"] == "extra_forbidden" else ""


def _path(error: ErrorDetails) -> list[str]:
    path = ["*" if isinstance(part, int) else part for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        path[-1] = "<unknown>"
    return path


def _matches(place: list[str], path: list[str]) -> bool:
    return len(path) >= len(place) and all(part in ("*", at) for part, at in zip(place, path, strict=False))


def validate(model: type[ModelT], body: object, refusals: Refusals) -> ModelT:
    """`body`, already read as JSON, as a `model`; raises `INVALID_INPUT` (422) with our message."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise INVALID_INPUT.error(refusals.message(exc.errors(include_url=False))) from None


class BodyModel(BaseModel):
    """A JSON body as a client sends it, strictly typed. Fields that may be left out default to
    `MISSING`, so an explicit `null` is refused, not taken for absent."""

    model_config = ConfigDict(strict=True, frozen=True)
    refusals: ClassVar[Refusals]

    @classmethod
    def parse(cls, body: object) -> Self:
        return validate(cls, body, cls.refusals)

    @model_validator(mode="before")
    @classmethod
    def _one_unknown_field(cls, body: object) -> object:
        """Only the first unknown field (in alphabetical order) is ever named, so the others are left
        out before validation: thousands of them would otherwise cost an error each."""
        if (
            cls.model_config.get("extra") != "forbid"
            or not isinstance(body, dict)
            or len(body) <= len(cls.model_fields)
        ):
            return body
        known = {field.alias or name for name, field in cls.model_fields.items()}
        unknown = [key for key in body if key not in known]
        if len(unknown) < 2:
            return body
        first = min(unknown)
        return {key: value for key, value in body.items() if key in known or key == first}


class TokenRequest(BodyModel):
    """`POST /api/token`: which workflow the token is for (the stream URL names it), and its TTL."""

    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(description="A configured workflow alias.")
    ttl: Annotated[int, Field(ge=1, description="Seconds; clamped to BFF_TOKEN_TTL.")] | MISSING = MISSING

    refusals = Refusals(
        'Send {"workflow": "<name>"} with an optional "ttl" in seconds.',
        {
            "workflow": 'Send {"workflow": "<name>"} with an optional "ttl" in seconds.',
            "<unknown>": lambda error: f"Unknown field: {str(error['loc'][-1])[:64]!r}.",
            "ttl": '"ttl" must be a whole number of seconds, at least 1.',
        },
    )

    @classmethod
    def parse_for(cls, body: object, known: Callable[[str], object]) -> Self:
        """`parse`, with the workflow looked up by `known` (which raises for one not configured) after
        the body's shape and before its `ttl`: a client asking for no workflow is told that first."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if isinstance(body, dict) and all(error["loc"][:1] == ("ttl",) for error in errors):
                known(body["workflow"])  # only the ttl is wrong, so the workflow is a string
            raise INVALID_INPUT.error(cls.refusals.message(errors)) from None


# The answers the document describes. The session, token and run answers are built from them; the
# fuzz test (tests/test_fuzz.py) holds every answer, these and the others, to its schema.


class UserInfo(BaseModel):
    id: str
    kind: str
    # OpenID Connect sign-ins: the name the identity provider gave (absent for other kinds).
    name: str | MISSING = MISSING


class SessionInfo(BaseModel):
    """The signed-in user, when the session ends at the latest, and the user's limits."""

    user: UserInfo
    method: str  # how the session signed in: guest, jwt, password or oidc
    expires_at: IsoTime
    limits: dict[str, Any]


class Token(BaseModel):
    """A fresh single-use upstream stream token, and the URL it streams the workflow from."""

    token: str
    ttl: int
    expires_at: IsoTime
    stream_url: Annotated[str, WithJsonSchema({"type": "string", "format": "uri"})]


class RunResult(BaseModel):
    """A workflow's whole answer."""

    result: str
    citations: list[str]


class OutputUsage(BaseModel):
    """Today's (UTC) generated characters relayed to the user, as the output budget counts them."""

    used: int
    limit: int | None = Field(description="BFF_DAILY_OUTPUT_CHARS; null when there is no budget.")
    left: int | None = Field(description="What is left of the budget today; null when there is no budget.")
    renews_at: IsoTime = Field(description="The next UTC midnight, when the count starts again.")


class LimitUsage(BaseModel):
    """One rate limit of the user's, and what is left of its current window (nothing is counted)."""

    name: str = Field(description="mint or relay")
    workflow: str | None = Field(description="A workflow's own limit; null for the limit of every workflow.")
    limit: str = Field(description='As GET /auth/session shows it: "20 per 1 minute".')
    remaining: int
    resets_at: IsoTime = Field(description="When the window has room again (X-RateLimit-Reset).")


class StreamUsage(BaseModel):
    """BFF_MAX_CONCURRENT_STREAMS, and how many of the user's answers hold a slot now, on any replica."""

    limit: int
    in_use: int


class OpenRun(BaseModel):
    """An answer of the user's still being generated (GET /api/runs/{run_id}/stream follows it)."""

    run_id: str
    chat_id: str | None
    workflow: str
    started_at: IsoTime


class Usage(BaseModel):
    """`GET /api/usage`: the signed-in user's output today, limits, stream slots and open answers."""

    day: str = Field(description="The UTC day counted, YYYY-MM-DD.")
    counted_for: Literal["user", "address"] = Field(
        description="address: a guest whose output, limits and slots are shared by every guest at its IP "
        "address (BFF_GUEST_LIMITS=ip), so these figures include the other guests' use there."
    )
    output_chars: OutputUsage
    limits: list[LimitUsage]
    streams: StreamUsage
    runs: list[OpenRun]


class Status(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    """Every JSON error (CONTRACT B6): a stable code and a short message for people."""

    error: ErrorDetail


class UiStreamEvent(BaseModel):
    """One server-sent event of the AI SDK UI message stream."""

    data: str = Field(description="A UI message chunk as JSON, or [DONE] at the end.")


def name_pattern(pattern: re.Pattern[str]) -> str:
    """A Python pattern used with `fullmatch`, as a JSON Schema (and pydantic) pattern."""
    return f"^(?:{pattern.pattern})$"
