"""The workflow allowlist (CONTRACT B4) and the input policy applied before anything goes upstream."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from proxy.errors import ApiError, invalid_input
from proxy.limits import RateLimitConfigError, parse_limit

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
WORKFLOW_KEYS = frozenset({"id", "chat_input", "history_input", "image_input", "inputs", "fixed", "rate_limit"})


def is_https_url(url: str) -> bool:
    """An absolute https: URL with a host, and nothing a URL parser could read two ways."""
    if any(character.isspace() or not character.isprintable() for character in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname)


@dataclass(frozen=True)
class Workflow:
    alias: str
    id: str
    chat_input: str = "message"
    history_input: str | None = None
    image_input: str | None = None
    inputs: frozenset[str] | None = None  # None: any well-formed name
    fixed: Mapping[str, str] = field(default_factory=dict)
    rate_limit: str | None = None

    def build_inputs(self, submitted: object, max_chars: int) -> dict[str, str]:
        """Validate what the browser sent and merge the fixed inputs; never trusts the browser."""
        if not isinstance(submitted, dict):
            raise invalid_input("The body must be a JSON object of input names to text values.")
        inputs: dict[str, str] = {}
        for name, value in submitted.items():
            if not INPUT_NAME_PATTERN.fullmatch(name):
                raise invalid_input(f"{name[:64]!r} is not a valid input name.")
            if name in self.fixed:
                raise invalid_input(f"The input {name!r} is set by the server and cannot be changed.")
            if self.inputs is not None and name not in self.inputs:
                raise invalid_input(f"The input {name!r} is not accepted by this workflow.")
            if not isinstance(value, str):
                raise invalid_input(f"The input {name!r} must be a string.")
            if len(value) > max_chars:
                raise invalid_input(f"The input {name!r} is longer than {max_chars} characters.")
            if name == self.image_input and not all(is_https_url(url) for url in value.split("\n") if url):
                # The upstream fetches image inputs itself: http: could be read or changed on the way,
                # and javascript:/data:/file: URLs are no images it should be asked to fetch.
                raise invalid_input(f"The input {name!r} takes https: image URLs, one per line.")
            inputs[name] = value
        return {**inputs, **self.fixed}


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
            raise ApiError(404, "unknown_workflow", "No workflow is configured under that name.")
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
        workflows.append(_checked(Workflow(alias=alias.strip(), id=workflow_id.strip())))
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


def _from_toml(path: Path) -> list[Workflow]:
    try:
        text = path.read_text(encoding="utf-8")
        document = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WorkflowConfigError(f"cannot read {path}: {exc}", FILE_SETTING) from None

    def problem(message: str, table: str | None = None) -> WorkflowConfigError:
        line = _line_of(text, table) if table is not None else None
        return WorkflowConfigError(f"{path}{f', line {line}' if line else ''}: {message}", FILE_SETTING)

    for name in sorted(set(document) - {"workflows"}):
        hint = " (did you mean [workflows.…]?)" if name.rstrip("s") == "workflow" else ""
        raise problem(f"unknown table or key {name!r}{hint}; each workflow is a [workflows.<alias>] table", name)
    tables = document.get("workflows", {})
    if not isinstance(tables, dict):
        raise problem("workflows must be a table of tables, as in [workflows.tutor]", "workflows")
    workflows = []
    for alias, table in tables.items():
        where = f"workflows.{alias}"
        if not isinstance(table, dict):
            raise problem(f"[{where}] must be a table", where)
        unknown = sorted(set(table) - WORKFLOW_KEYS)
        if unknown:
            keys = ", ".join(sorted(WORKFLOW_KEYS))
            raise problem(f"[{where}] has unknown keys: {', '.join(unknown)} (known: {keys})", where)
        inputs = table.get("inputs")
        fixed = table.get("fixed", {})
        if inputs is not None and not (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)):
            raise problem(f"[{where}] inputs must be a list of names", where)
        if not (isinstance(fixed, dict) and all(isinstance(v, str) for v in fixed.values())):
            raise problem(f"[{where}] fixed must map names to strings", where)
        for key in ("history_input", "image_input", "rate_limit"):
            if not isinstance(table.get(key, ""), str):
                raise problem(f"[{where}] {key} must be a string", where)
        workflow = Workflow(
            alias=alias,
            id=str(table.get("id", "")),
            chat_input=str(table.get("chat_input", "message")),
            history_input=table.get("history_input"),
            image_input=table.get("image_input"),
            inputs=frozenset(inputs) if inputs is not None else None,
            fixed=dict(fixed),
            rate_limit=table.get("rate_limit"),
        )
        try:
            workflows.append(_checked(workflow))
        except WorkflowConfigError as exc:
            raise problem(str(exc.args[0]), where) from None
    return workflows


def _line_of(text: str, table: str) -> int | None:
    """The line that opens `[table]` (or `[table.…]`, or sets `table =`), for error messages."""
    pattern = re.compile(rf"^\s*(\[\s*{re.escape(table)}\s*[\].]|{re.escape(table)}\s*=)")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _checked(workflow: Workflow) -> Workflow:
    where = f"workflow {workflow.alias!r}"
    if not ALIAS_PATTERN.fullmatch(workflow.alias):
        raise WorkflowConfigError(f"{where}: the alias may use letters, digits, '_' and '-'")
    if not WORKFLOW_ID_PATTERN.fullmatch(workflow.id):
        raise WorkflowConfigError(f"{where}: the id must look like wf_abc123")
    if workflow.rate_limit is not None:
        try:
            parse_limit(workflow.rate_limit)
        except RateLimitConfigError as exc:
            raise WorkflowConfigError(f"{where}: rate_limit {exc}") from None
    chat_names = [n for n in (workflow.chat_input, workflow.history_input, workflow.image_input) if n is not None]
    for name in [*chat_names, *workflow.fixed, *sorted(workflow.inputs or ())]:
        if not INPUT_NAME_PATTERN.fullmatch(name):
            raise WorkflowConfigError(f"{where}: {name!r} is not a valid input name")
    # Each chat input carries something of its own; a shared name would silently drop one of them
    # (a fixed value always wins).
    if len(set(chat_names)) < len(chat_names) or set(chat_names) & set(workflow.fixed):
        raise WorkflowConfigError(
            f"{where}: chat_input, history_input and image_input must be different inputs, and none of them fixed"
        )
    return workflow
