"""The workflow allowlist (CONTRACT B4) and the input policy applied before anything goes upstream.

Both shapes are models: `Workflow` is one `[workflows.<alias>]` table of BFF_WORKFLOWS_FILE (or one
`alias=id` of BFF_WORKFLOWS) with its alias, checked as a whole; `WorkflowInputs` is the body of
`/api/workflows/{alias}/stream` and `/run`, whose names and values a workflow then holds to its own
policy (`Workflow.build_inputs`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationError, model_validator
from pydantic_core import ErrorDetails

from proxy.errors import INVALID_INPUT, UNKNOWN_WORKFLOW
from proxy.limits import RateLimitConfigError, parse_limit
from proxy.models import FAIL_FAST, Refusals, message_of, name_pattern, refused, validate

ALIAS_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Workflow ids end up in an upstream URL path, so they are held to a strict shape.
WORKFLOW_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
INPUT_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class WorkflowConfigError(ValueError):
    """A problem with the workflows, named by the setting that holds it."""

    def __init__(self, message: str, setting: str = "BFF_WORKFLOWS") -> None:
        super().__init__(message)
        self.setting = setting

    def __str__(self) -> str:
        return f"{self.setting}: {self.args[0]}"


FILE_SETTING = "BFF_WORKFLOWS_FILE"
BAD_ID = "the id must look like wf_abc123"
# What an operator is told about a table's fields of the wrong type, in the order they are checked.
TABLE_PROBLEMS = {
    "inputs": "inputs must be a list of names",
    "fixed": "fixed must map names to strings",
    "history_input": "history_input must be a string",
    "image_input": "image_input must be a string",
    "rate_limit": "rate_limit must be a string",
}


def is_https_url(url: str) -> bool:
    """An absolute https: URL with a host, and nothing a URL parser could read two ways."""
    if any(character.isspace() or not character.isprintable() for character in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname)


InputName = Annotated[str, Field(pattern=name_pattern(INPUT_NAME_PATTERN))]


class WorkflowInputs(RootModel[Annotated[dict[InputName, str], FAIL_FAST]]):
    """Workflow input variables: names matching [A-Za-z_][A-Za-z0-9_]{0,63}, text values. Which names a
    workflow takes, and how long a value may be, is the workflow's own (CONTRACT B4)."""

    model_config = ConfigDict(strict=True, frozen=True, json_schema_extra={"additionalProperties": False})
    refusals: ClassVar[Refusals] = Refusals(
        "The body must be a JSON object of input names to text values.",
        # One place, so the first bad input in the body is told: its name, or else its value.
        {"*": lambda error: _input_problem(*error["loc"])},
    )

    @classmethod
    def parse(cls, body: object) -> Self:
        return validate(cls, body, cls.refusals)


def _input_problem(name: object, *key: object) -> str:
    """What is wrong with a submitted input: its name (`loc` ends in "[key]"), or its value."""
    return f"{str(name)[:64]!r} is not a valid input name." if key else f"The input {name!r} must be a string."


AsText = Annotated[str, BeforeValidator(str)]


class WorkflowTable(BaseModel):
    """One `[workflows.<alias>]` table of BFF_WORKFLOWS_FILE, as written (CONTRACT B4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Any value is read as its text (`id = 123` is "123"), which the rules below then judge; a left
    # out id is "", refused by the id's rule after the alias's, in the order an operator reads them.
    id: AsText = ""
    chat_input: AsText = "message"
    history_input: str | None = None
    image_input: str | None = None
    inputs: frozenset[str] | None = None  # None: any well-formed name
    fixed: dict[str, str] = Field(default_factory=dict)
    rate_limit: str | None = None


WORKFLOW_KEYS = frozenset(WorkflowTable.model_fields)


class Workflow(WorkflowTable):
    """A configured workflow: its table and its alias, checked together."""

    alias: str

    @model_validator(mode="after")
    def _checked(self) -> Self:
        if not ALIAS_PATTERN.fullmatch(self.alias):
            raise refused("the alias may use letters, digits, '_' and '-'")
        if not WORKFLOW_ID_PATTERN.fullmatch(self.id):
            raise refused(BAD_ID)
        if self.rate_limit is not None:
            try:
                parse_limit(self.rate_limit)
            except RateLimitConfigError as exc:
                raise refused(f"rate_limit {exc}") from None
        chat_names = [n for n in (self.chat_input, self.history_input, self.image_input) if n is not None]
        for name in [*chat_names, *self.fixed, *sorted(self.inputs or ())]:
            if not INPUT_NAME_PATTERN.fullmatch(name):
                raise refused(f"{name!r} is not a valid input name")
        # Each chat input carries something of its own; a shared name would silently drop one of them
        # (a fixed value always wins).
        if len(set(chat_names)) < len(chat_names) or set(chat_names) & set(self.fixed):
            raise refused("chat_input, history_input and image_input must be different inputs, and none of them fixed")
        return self

    def build_inputs(self, submitted: object, max_chars: int) -> dict[str, str]:
        """Validate what the browser sent and merge the fixed inputs; never trusts the browser.

        Each input is judged whole before the next, in the body's order, and its name before its
        value: an input the server sets, or the workflow does not take, is told so whatever its value.
        The model judges names and value types, stopping at the first input it refuses, so this
        workflow's own rules are applied up to that input, and the model tells the rest."""
        for name, value in submitted.items() if isinstance(submitted, dict) else ():
            if not isinstance(name, str) or not INPUT_NAME_PATTERN.fullmatch(name):
                break
            if name in self.fixed:
                raise INVALID_INPUT.error(f"The input {name!r} is set by the server and cannot be changed.")
            if self.inputs is not None and name not in self.inputs:
                raise INVALID_INPUT.error(f"The input {name!r} is not accepted by this workflow.")
            if not isinstance(value, str):
                break
            if len(value) > max_chars:
                raise INVALID_INPUT.error(f"The input {name!r} is longer than {max_chars} characters.")
            if name == self.image_input and not all(is_https_url(url) for url in value.split("\n") if url):
                # The upstream fetches image inputs itself: http: could be read or changed on the way,
                # and javascript:/data:/file: URLs are no images it should be asked to fetch.
                raise INVALID_INPUT.error(f"The input {name!r} takes https: image URLs, one per line.")
        return {**WorkflowInputs.parse(submitted).root, **self.fixed}


class WorkflowsFile(BaseModel):
    """BFF_WORKFLOWS_FILE: a `[workflows.<alias>]` table per workflow, and nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    workflows: dict[str, WorkflowTable] = Field(default_factory=dict)


class WorkflowRegistry:
    def __init__(self, workflows: list[Workflow]) -> None:
        self._by_alias = {workflow.alias: workflow for workflow in workflows}

    def __len__(self) -> int:
        return len(self._by_alias)

    def aliases(self) -> list[str]:
        return sorted(self._by_alias)

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._by_alias.values())

    def get(self, alias: str) -> Workflow:
        workflow = self._by_alias.get(alias)
        if workflow is None:
            raise UNKNOWN_WORKFLOW.error()
        return workflow


def parse_workflows(simple: str, file: Path | None) -> WorkflowRegistry:
    """Build the registry from `BFF_WORKFLOWS` ("alias=id,...") and/or `BFF_WORKFLOWS_FILE` (TOML)."""
    workflows: list[Workflow] = []
    for entry in (item.strip() for item in simple.split(",")):
        if not entry:
            continue
        alias, sep, workflow_id = entry.partition("=")
        if not sep:
            raise WorkflowConfigError(f"{entry!r} is not of the form alias=workflow_id, as in tutor=wf_abc123")
        if "=" in workflow_id or ";" in workflow_id:
            raise WorkflowConfigError(f"{entry!r}: separate workflows with ',', as in tutor=wf_abc123,story=wf_def456")
        workflows.append(_workflow(alias.strip(), {"id": workflow_id.strip()}))
    if file is not None:
        workflows.extend(_from_toml(file))
    if not workflows:
        if file is not None:
            message = f"{file}: no workflow is configured: add [workflows.<alias>] tables (or set BFF_WORKFLOWS)"
            raise WorkflowConfigError(message, FILE_SETTING)
        raise WorkflowConfigError("no workflow is configured: set BFF_WORKFLOWS=alias=wf_id (or BFF_WORKFLOWS_FILE)")
    aliases = [workflow.alias for workflow in workflows]
    duplicates = sorted({alias for alias in aliases if aliases.count(alias) > 1})
    if duplicates:
        raise WorkflowConfigError(f"alias defined twice: {', '.join(duplicates)}")
    return WorkflowRegistry(workflows)


def _workflow(alias: str, table: dict[str, Any]) -> Workflow:
    try:
        return Workflow.model_validate({**table, "alias": alias})
    except ValidationError as exc:
        raise WorkflowConfigError(f"workflow {alias!r}: {message_of(exc.errors()[0])}") from None


def _from_toml(path: Path) -> list[Workflow]:
    try:
        text = path.read_text(encoding="utf-8")
        document = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WorkflowConfigError(f"cannot read {path}: {exc}", FILE_SETTING) from None

    def problem(message: str, table: str | None = None) -> WorkflowConfigError:
        line = _line_of(text, table) if table is not None else None
        return WorkflowConfigError(f"{path}{f', line {line}' if line else ''}: {message}", FILE_SETTING)

    try:
        WorkflowsFile.model_validate(document)
        errors = []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    outside = [error for error in errors if len(error["loc"]) == 1]  # unknown tables, or workflows not a table
    if outside:
        raise problem(*_outside_problem(outside))
    workflows = []
    for alias, table in document.get("workflows", {}).items():  # each table whole, as the file reads
        where = f"workflows.{alias}"
        wrong = [error for error in errors if error["loc"][1] == alias]
        if wrong:
            raise problem(_table_problem(alias, wrong), where)
        try:
            workflows.append(_workflow(alias, table))
        except WorkflowConfigError as exc:
            raise problem(str(exc.args[0]), where) from None
    return workflows


def _outside_problem(errors: list[ErrorDetails]) -> tuple[str, str]:
    """What an operator is told about the file outside the tables, and where: unknown names first."""
    unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
    if unknown:
        name = unknown[0]
        hint = " (did you mean [workflows.…]?)" if name.rstrip("s") == "workflow" else ""
        return f"unknown table or key {name!r}{hint}; each workflow is a [workflows.<alias>] table", name
    return "workflows must be a table of tables, as in [workflows.tutor]", "workflows"


def _table_problem(alias: str, errors: list[ErrorDetails]) -> str:
    """What an operator is told about a table of the wrong shape."""
    where = f"workflows.{alias}"
    fields = {str(error["loc"][2]): error for error in errors if len(error["loc"]) > 2}
    if not fields:
        return f"[{where}] must be a table"
    unknown = sorted(name for name, error in fields.items() if error["type"] == "extra_forbidden")
    if unknown:
        return f"[{where}] has unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(WORKFLOW_KEYS))})"
    for name, message in TABLE_PROBLEMS.items():
        if name in fields:
            return f"[{where}] {message}"
    return f"[{where}] {message_of(errors[0])}"  # not reached: every field that can be wrong is above


def _line_of(text: str, table: str) -> int | None:
    """The line that opens `[table]` (or `[table.…]`, or sets `table =`), for error messages."""
    pattern = re.compile(rf"^\s*(\[\s*{re.escape(table)}\s*[\].]|{re.escape(table)}\s*=)")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None
