"""deploy/: Docker cannot run here, so the Dockerfile, compose, nginx and Kubernetes files are read with
parsers and checked against the app itself: its settings, its routes, its port and its drain time. What
the real tools check is checked too: hadolint on the Dockerfile, `nginx -t`, the Kubernetes API schemas
(kubernetes-validate) and the Compose Specification's schema plus what `docker compose config` resolves
(interpolation, required variables, env files, mounts). The Redis command lines of both setups run
against a real `redis-server`, and the lock files are checked against pyproject.toml.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.routing import Route

from proxy.app import create_app
from proxy.cli import GRACEFUL_SHUTDOWN_SECONDS, ConfigError, load_settings
from proxy.emulator import generate_text
from proxy.settings import Settings
from proxy.storage import REDIS_SCHEMES, storage_scheme
from proxy.workflows import parse_workflows
from tests.conftest import IN_CI, require_tool
from tests.servers import ROOT, ServerProcess, browser, eventually, free_port, guest_of, parse_json, start_proxy

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
# What an operator puts in deploy/.env and the Secrets: fresh random values, as `python -m proxy secret`
# makes them (the placeholders that ship are refused by `serve`).
OPERATOR_SECRETS = {
    "BFF_API_KEY": "sk_live_" + secrets.token_urlsafe(24),
    "BFF_SESSION_SECRETS": secrets.token_urlsafe(48),
    "REDIS_PASSWORD": secrets.token_urlsafe(48),
}
# The Secrets of deploy/k8s/secret.yaml, (name, key) -> the operator's value for that placeholder.
K8S_SECRETS = {
    ("workflow-bff", "BFF_API_KEY"): OPERATOR_SECRETS["BFF_API_KEY"],
    ("workflow-bff", "BFF_SESSION_SECRETS"): OPERATOR_SECRETS["BFF_SESSION_SECRETS"],
    ("redis", "password"): OPERATOR_SECRETS["REDIS_PASSWORD"],
}
PROXIES = ("proxy-1", "proxy-2")
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - inside a container, the port is reachable only as published
# An image pinned to an exact release: name:1.2.3 (a suffix such as -slim-bookworm allowed), or a digest.
EXACT_IMAGE = re.compile(
    r"^[\w.\-/]+:\d+\.\d+\.\d+(-[\w.\-]+)?(@sha256:[0-9a-f]{64})?$|^[\w.\-/]+@sha256:[0-9a-f]{64}$"
)
# The Kubernetes versions the manifests are checked against: the oldest one still in wide use, and the
# newest kubernetes-validate knows (its own default).
OLDEST_KUBERNETES = "1.28.0"


def require_module(name: str) -> ModuleType:
    """A Python package the dev extra installs; skips where it is missing, except under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (pyproject.toml's dev extra installs it)")
        pytest.skip(f"{name} is not installed (make test installs it)")


def installed_tool(name: str) -> str:
    """A command the dev extra installs into this virtualenv, whose bin/ need not be on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_tool(name)


# Reading the files


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)  # shell form is not JSON: this fails for it
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed)
    return parsed


def image_command() -> list[str]:
    return exec_form(next(args for name, args in final_stage() if name == "CMD"))


def app_port() -> int:
    command = image_command()
    return int(command[command.index("--port") + 1])


@cache
def compose() -> dict[str, Any]:
    """docker-compose.yml as written, before interpolation."""
    loaded = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    found = compose()["services"][name]
    assert isinstance(found, dict)
    return found


class ComposeError(Exception):
    """What `docker compose config` (and so `up`) would refuse the project with."""


INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`."""

    def one(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(5)
        operator, argument = match.group(3), match.group(4) or ""
        if not operator:
            return env.get(name, "")
        missing = not env.get(name) if operator.startswith(":") else name not in env
        if not missing:
            return env[name]
        if operator.endswith("?"):
            raise ComposeError(f"required variable {name} is missing a value: {argument}")
        return argument

    result = INTERPOLATION.sub(one, value)
    assert "${" not in result, f"not interpolated: {value!r}"
    return result


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """An env file as compose reads one: KEY=VALUE lines, blank lines and `#` comments skipped, quotes
    removed, an unquoted value ending at ` #`."""
    values = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name.strip()):
            raise ComposeError(f"{path.name}:{number}: not NAME=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] in "'\"" and value[-1] == value[0]:
            value = value[1:-1]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        values[name.strip()] = value
    return values


@cache
def compose_schema() -> dict[str, Any]:
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    assert isinstance(schema, dict)
    return schema


def compose_config(project: Path, shell: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What `docker compose -f <project>/docker-compose.yml config` resolves: variables from the project's
    .env (the shell's win) interpolated, the result valid against the Compose Specification's schema,
    every env_file read (it must exist) under each service's `environment`, every bind-mount source
    present, every service, network and volume that is referred to declared."""
    dotenv = read_env_file(project / ".env") if (project / ".env").is_file() else {}
    raw = yaml.safe_load((project / "docker-compose.yml").read_text())
    config: dict[str, Any] = interpolate_tree(raw, {**dotenv, **(shell or {})})
    validator = require_module("jsonschema").Draft7Validator(compose_schema())
    problems = [f"{'/'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(config)]
    assert not problems, problems
    for name, spec in config["services"].items():
        environment: dict[str, str] = {}
        for entry in spec.get("env_file", []):
            path = project / (entry if isinstance(entry, str) else entry["path"])
            if not path.is_file():
                raise ComposeError(f"{name}: env file {path} not found")
            environment.update(read_env_file(path))
        declared = spec.get("environment") or {}
        if isinstance(declared, list):
            declared = dict(item.split("=", 1) for item in declared)
        environment.update({key: str(value) for key, value in declared.items()})
        spec["environment"] = environment
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (project / source).exists(), f"{name}: mount source {source} does not exist"
            else:
                assert source in (config.get("volumes") or {}), f"{name}: volume {source} not declared"
        assert set(spec.get("depends_on", {})) <= set(config["services"]), name
        assert set(spec.get("networks", {})) <= set(config.get("networks") or {}), name
    return config


def env_file_text(values: Mapping[str, str | None]) -> str:
    """deploy/.env.example as an operator fills it in: each named variable set (a commented example line
    taken in), or dropped where the value is None; the rest as shipped."""
    lines, seen = [], set()
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        named = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if named and named.group(1) in values:
            name = named.group(1)
            if name not in seen and values[name] is not None:
                lines.append(f"{name}={values[name]}")
            seen.add(name)
            continue
        lines.append(line)
    lines += [f"{name}={value}" for name, value in values.items() if name not in seen and value is not None]
    return "\n".join(lines) + "\n"


def deploy_copy(directory: Path, values: Mapping[str, str | None] | None = None) -> Path:
    """A copy of deploy/ with the .env an operator made from .env.example (the secrets filled in)."""
    project = directory / "deploy"
    shutil.copytree(DEPLOY, project, ignore=shutil.ignore_patterns(".env"))
    (project / ".env").write_text(env_file_text({**OPERATOR_SECRETS, **(values or {})}))
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deploy_copy(tmp_path_factory.mktemp("compose"))


def replica_env(project: Path, name: str = PROXIES[0]) -> dict[str, str]:
    """The environment compose gives replica `name` of `project` (a copy of deploy/ with its .env)."""
    environment: dict[str, str] = compose_config(project)["services"][name]["environment"]
    return environment


def bff_settings(environment: Mapping[str, str]) -> Settings:
    return settings_from({name: value for name, value in environment.items() if name.startswith("BFF_")})


@cache
def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        documents += [doc for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc]
    return documents


def k8s(kind: str, name: str = "workflow-bff") -> dict[str, Any]:
    matches = [doc for doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(kind: str, name: str) -> dict[str, Any]:
    containers = k8s(kind, name)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == name)
    return found


def bff_container() -> dict[str, Any]:
    return container("Deployment", "workflow-bff")


def redis_container() -> dict[str, Any]:
    return container("StatefulSet", "redis")


@cache
def kustomization() -> dict[str, Any]:
    loaded = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def rendered_manifests() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/k8s` makes of them: the namespace set on every namespaced
    resource, the labels added to every resource's own (not to its selectors)."""
    labels = {key: value for entry in kustomization().get("labels", []) for key, value in entry["pairs"].items()}
    rendered = []
    for original in k8s_documents():
        document = json.loads(json.dumps(original))
        metadata = document["metadata"]
        metadata["labels"] = {**metadata.get("labels", {}), **labels}
        if document["kind"] != "Namespace" and "namespace" in kustomization():
            metadata["namespace"] = kustomization()["namespace"]
        rendered.append(document)
    return rendered


def secret_data(name: str, *, operator: bool = True) -> dict[str, str]:
    """A Secret of secret.yaml, its placeholders replaced by what an operator would put there."""
    data: dict[str, str] = dict(k8s("Secret", name)["stringData"])
    if operator:
        data = {key: K8S_SECRETS.get((name, key), value) for key, value in data.items()}
    return data


def expand_references(value: str, environment: Mapping[str, str]) -> str:
    """The kubelet's `$(NAME)` in env values, command and args: `$$` escapes, an undefined name stays."""
    return re.sub(
        r"\$\$|\$\((\w+)\)",
        lambda match: "$" if match.group(0) == "$$" else environment.get(match.group(1), match.group(0)),
        value,
    )


def container_environment(spec: Mapping[str, Any], *, operator: bool = True) -> dict[str, str]:
    """The environment the kubelet gives a container: envFrom, then env in order, each `$(NAME)`
    expanded from what is defined before it."""
    environment: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(k8s("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            environment.update(secret_data(source["secretRef"]["name"], operator=operator))
    for variable in spec.get("env", []):
        if "value" in variable:
            value = expand_references(variable["value"], environment)
            assert "$(" not in value, f"{variable['name']} refers to something undefined: {value}"
            environment[variable["name"]] = value
        else:
            reference = variable["valueFrom"]["secretKeyRef"]
            environment[variable["name"]] = secret_data(reference["name"], operator=operator)[reference["key"]]
    return environment


MEMORY_UNITS = {"": 1, "ki": 2**10, "mi": 2**20, "gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}


def memory_bytes(quantity: str) -> int:
    """`512Mi` (Kubernetes), `512m` (Docker, MiB) or `256mb` (Redis, MiB)."""
    match = re.fullmatch(r"(\d+)([a-zA-Z]*)", quantity)
    assert match is not None, quantity
    unit = match.group(2).lower()
    return int(match.group(1)) * MEMORY_UNITS[{"k": "kb", "m": "mb", "g": "gb"}.get(unit, unit)]


def nginx_directives() -> list[list[str]]:
    """Every `name args...;` of deploy/nginx.conf, comments removed (enough for this flat file)."""
    text = re.sub(r"#[^\n]*", "", (DEPLOY / "nginx.conf").read_text())
    statements = re.split(r"[;{}]", text)
    return [statement.split() for statement in statements if statement.strip()]


def nginx_values(name: str) -> list[list[str]]:
    return [directive[1:] for directive in nginx_directives() if directive[0] == name]


def seconds(duration: str | int) -> float:
    """`45s`, `1m30s`, `360` (seconds) as compose, nginx and Kubernetes write them."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.findall(r"(\d+)(ms|h|m|s)?", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"ms": 0.001, "h": 3600, "m": 60, "s": 1, "": 1}
    return sum(int(number) * scale[unit] for number, unit in parts)


@cache
def app_paths() -> frozenset[str]:
    secret = "b7bd55c11b781b0ccc43aa6e57f9dadf0660e9d1d4e27e09"
    settings = load_settings(_env_file=None, api_key="k", session_secrets=secret, workflows="tutor=wf_x", auth="guest")
    return frozenset(route.path for route in create_app(settings).routes if isinstance(route, Route))


def setting_names() -> set[str]:
    return {f"BFF_{name.upper()}" for name in Settings.model_fields}


def settings_from(env: Mapping[str, str]) -> Settings:
    """The settings a process with exactly these BFF_* variables would get (and so, that they are valid)."""
    unknown = sorted(set(env) - setting_names())
    assert not unknown, f"not settings of this app: {unknown}"
    return load_settings(_env_file=None, **{name.removeprefix("BFF_").lower(): value for name, value in env.items()})


def http_probe_paths(container: Mapping[str, Any]) -> Iterator[str]:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        yield container[probe]["httpGet"]["path"]


# Dockerfile and .dockerignore


def test_the_image_is_a_multi_stage_build_on_one_exactly_pinned_slim_python() -> None:
    stages = [args.split()[0] for name, args in dockerfile() if name == "FROM"]

    assert len(stages) >= 2
    [base] = set(stages)  # every stage on the same base, so the venv built in one runs in the other
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final_stage()


def test_the_image_installs_exactly_the_locked_set() -> None:
    runs = [args for name, args in dockerfile() if name == "RUN"]
    installs = [part.strip() for args in runs for part in args.split("&&") if "pip install" in part]

    assert "pip install --require-hashes --no-deps -r requirements.lock" in installs
    assert all("--no-deps" in install for install in installs), installs  # nothing resolved at build time
    assert any(install.endswith(" .") and "--no-build-isolation" in install for install in installs)
    assert any("pip check" in args for args in runs)
    copies = [args for name, args in dockerfile() if name == "COPY"]
    assert copies.index("requirements.lock ./") < copies.index("proxy ./proxy")  # its own cached layer


def test_the_image_runs_as_a_numeric_non_root_user_matching_kubernetes() -> None:
    users = [args for name, args in final_stage() if name == "USER"]

    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    pod = k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))


def test_the_image_starts_the_service_in_exec_form_on_all_interfaces() -> None:
    assert image_command() == ["python", "-m", "proxy", "serve", "--host", ALL_INTERFACES, "--port", str(app_port())]
    assert ("EXPOSE", str(app_port())) in final_stage()
    healthcheck = next(args for name, args in final_stage() if name == "HEALTHCHECK")
    assert f"127.0.0.1:{app_port()}/healthz" in healthcheck
    exec_form(healthcheck.split("CMD", 1)[1])


def test_the_image_carries_no_secret_and_no_local_files() -> None:
    for name, args in dockerfile():
        if name in ("ENV", "ARG"):
            assert "API_KEY" not in args and "SECRET" not in args
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "*"  # an allow-list: .env, .venv and .git can never reach the build context
    allowed = {line[1:].rstrip("/") for line in patterns if line.startswith("!")}
    for name, args in dockerfile():
        if name == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = installed_tool("hadolint")

    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_is_pinned_to_an_exact_release() -> None:
    images = [args.split()[0] for name, args in dockerfile() if name == "FROM"]
    images += [spec["image"] for spec in compose()["services"].values() if "build" not in spec]
    for document in k8s_documents():
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        images += [spec["image"] for spec in pod.get("containers", [])]

    assert len(images) >= 6
    assert [image for image in images if not EXACT_IMAGE.match(image)] == []


# The lock files


def lock_entries(path: Path) -> dict[str, list[tuple[Requirement, list[str]]]]:
    """name -> its (requirement, hashes) lines; a universal lock may pin one name per Python version."""
    entries: dict[str, list[tuple[Requirement, list[str]]]] = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            text, *hashes = re.split(r"\s+--hash=", line)
            requirement = Requirement(text)
            entries.setdefault(canonicalize_name(requirement.name), []).append((requirement, hashes))
    return entries


# The image's platform: what a lock's markers are evaluated for.
IMAGE_PLATFORM: dict[str, str] = {
    **{name: str(value) for name, value in default_environment().items()},
    "python_version": "3.11",
    "python_full_version": "3.11.16",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def pinned_versions(path: Path) -> dict[str, str]:
    """name -> the version the lock installs on the image's platform, every line checked: one exact
    version, and hashes."""
    pins = {}
    for name, lines in lock_entries(path).items():
        for requirement, hashes in lines:
            [specifier] = requirement.specifier
            assert specifier.operator == "==", requirement
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), requirement
        applying = [r for r, _ in lines if r.marker is None or r.marker.evaluate(IMAGE_PLATFORM)]
        assert len(applying) <= 1, applying
        if applying:
            pins[name] = next(iter(applying[0].specifier)).version
    return pins


def test_the_lock_files_pin_every_dependency_and_the_build_tools_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    runtime = [*project["project"]["dependencies"], *build]
    extras = project["project"]["optional-dependencies"]
    runtime_pins, dev_pins = pinned_versions(LOCK), pinned_versions(DEV_LOCK)

    # Each is current: every requirement of pyproject.toml is in it, at a version it allows.
    for pins, requirements in ((runtime_pins, runtime), (dev_pins, [*runtime, *extras["dev"], *extras["bench"]])):
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{name} is not locked: run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), f"{text}: locked {pins[name]}"
        assert "pip" in pins and "setuptools" in pins  # installs use --no-build-isolation
    # The image and `make test` run the same versions of what they share.
    assert {name: dev_pins.get(name) for name in runtime_pins} == runtime_pins
    for lock in (LOCK, DEV_LOCK):
        assert "make lock" in lock.read_text().split("\n", 3)[1]  # the header says how to regenerate it


def make_dry_run(*targets: str) -> list[str]:
    """The commands `make` would run for `targets` (-B: as on a clean clone), without running them."""
    make = require_tool("make")
    result = subprocess.run(
        [make, "-n", "-B", *targets], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout.replace("\\\n", " ").splitlines()


def test_make_installs_exactly_the_lock_and_make_lock_regenerates_it() -> None:
    for target, lock in ((".venv/.installed", LOCK), (".venv/.installed-dev", DEV_LOCK)):
        commands = make_dry_run(target)
        installs = [command for command in commands if "pip install" in command]
        assert any(f"--require-hashes --no-deps -r {lock.name}" in command for command in installs), installs
        assert all("--no-deps" in command for command in installs), installs
        assert any(command.endswith("pip check") for command in commands), commands
    for target in ("lint", "typecheck", "bench-quick"):  # and pytest, whose node installs need npm
        assert any(".installed-dev" in line for line in make_dry_run(target) if "touch" in line), target
    assert re.search(r"^pytest: \$\(VENV\)/\.installed-dev ", (ROOT / "Makefile").read_text(), re.MULTILINE)

    regenerate = " ".join(make_dry_run("lock"))
    assert re.search(r"pip install --quiet \"uv==\d+\.\d+\.\d+\"", regenerate)  # the locking tool is pinned too
    assert regenerate.count("uv pip compile pyproject.toml") == 2
    assert "--generate-hashes" in regenerate and "--universal" in regenerate
    assert f"-o {LOCK.name}" in regenerate and f"-o {DEV_LOCK.name}" in regenerate
    assert "--extra dev --extra bench" in regenerate and f"-c {LOCK.name}" in regenerate


# docker-compose


def test_compose_runs_redis_two_replicas_and_nginx() -> None:
    assert set(compose()["services"]) == {"redis", *PROXIES, "nginx"}
    for name in PROXIES:
        proxy = service(name)
        assert proxy["build"]["context"] == ".."
        assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_config_resolves_against_the_compose_specification(project: Path) -> None:
    config = compose_config(project)  # schema, interpolation, env files, mounts, references

    assert config["services"][PROXIES[0]]["environment"] == config["services"][PROXIES[1]]["environment"]
    assert config["name"] == "workflow-bff"


def test_compose_refuses_to_start_without_a_required_variable_or_deploy_env(tmp_path: Path) -> None:
    for name in OPERATOR_SECRETS:
        with pytest.raises(ComposeError, match=f"required variable {name} "):
            compose_config(deploy_copy(tmp_path / name, {name: None}))
        with pytest.raises(ComposeError, match=f"required variable {name} "):
            compose_config(deploy_copy(tmp_path / f"{name}-empty", {name: ""}))
    without_env = deploy_copy(tmp_path / "no-env")
    (without_env / ".env").unlink()
    with pytest.raises(ComposeError, match=r"(required variable|env file .* not found)"):
        compose_config(without_env, shell=OPERATOR_SECRETS)  # set in the shell, but deploy/.env is missing


def test_every_setting_in_deploy_env_reaches_the_replicas(tmp_path: Path) -> None:
    chosen = {
        "BFF_RATE_LIMITS": "mint=5/minute;relay=4/minute;login=3/minute",
        "BFF_DAILY_OUTPUT_CHARS": "200000",
        "BFF_ALLOWED_ORIGINS": "https://app.example.com",
        "BFF_MAX_CONCURRENT_STREAMS": "2",
        "BFF_AUTH": "guest,jwt",
        "BFF_JWT_SECRET": secrets.token_urlsafe(48),
        "BFF_COOKIE_SECURE": "false",
    }
    config = compose_config(deploy_copy(tmp_path, chosen))

    for name in PROXIES:
        environment = config["services"][name]["environment"]
        assert {key: environment.get(key) for key in chosen} == chosen
        settings = bff_settings(environment)
        assert settings.daily_output_chars == 200000
        assert settings.allowed_origins == ["https://app.example.com"]
        assert settings.max_concurrent_streams == 2
        assert settings.missing_for_serve() == []
    # The examples in .env.example are settings of this app, spelled right.
    example = (DEPLOY / ".env.example").read_text()
    assert set(re.findall(r"^#?\s*(BFF_\w+)=", example, re.MULTILINE)) <= setting_names()


def test_every_replica_gets_valid_complete_settings_from_compose(project: Path) -> None:
    for name in PROXIES:
        environment = replica_env(project, name)
        settings = bff_settings(environment)
        assert settings.missing_for_serve() == []
        assert settings.api_key is not None and settings.api_key.get_secret_value() == OPERATOR_SECRETS["BFF_API_KEY"]


def test_a_workflows_file_in_deploy_config_is_what_the_replicas_load(tmp_path: Path) -> None:
    host = deploy_copy(tmp_path, {"BFF_WORKFLOWS": None, "BFF_WORKFLOWS_FILE": "/config/workflows.toml"})
    shutil.copy(host / "config" / "workflows.example.toml", host / "config" / "workflows.toml")
    replica = compose_config(host)["services"][PROXIES[0]]
    mounts = {target: (host / source, rest) for source, target, *rest in (v.split(":") for v in replica["volumes"])}

    in_container = PurePosixPath(replica["environment"]["BFF_WORKFLOWS_FILE"])
    mount = next(target for target in mounts if in_container.is_relative_to(target))
    source, options = mounts[mount]
    on_host = source / in_container.relative_to(mount)
    settings = bff_settings({**replica["environment"], "BFF_WORKFLOWS_FILE": str(on_host)})

    assert settings.missing_for_serve() == []
    assert parse_workflows(settings.workflows, settings.workflows_file).aliases() == ["tutor"]
    assert options == ["ro"]
    assert "deploy/config/" in (ROOT / ".gitignore").read_text()  # operators' files stay out of git


def test_redis_is_health_checked_private_password_protected_and_awaited(project: Path) -> None:
    redis_service = compose_config(project)["services"]["redis"]

    assert "ports" not in redis_service
    assert redis_service["healthcheck"]["test"][0] == "CMD-SHELL" and "PONG" in redis_service["healthcheck"]["test"][1]
    command = redis_service["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == OPERATOR_SECRETS["REDIS_PASSWORD"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = memory_bytes(command[command.index("--maxmemory") + 1])
    assert 0 < maxmemory < memory_bytes(redis_service["mem_limit"])
    for name in PROXIES:
        assert service(name)["depends_on"]["redis"]["condition"] == "service_healthy"
        url = urlsplit(replica_env(project, name)["BFF_STORAGE_URL"])
        assert storage_scheme(url.geturl()) in REDIS_SCHEMES
        assert (url.hostname, url.port, url.password) == ("redis", 6379, OPERATOR_SECRETS["REDIS_PASSWORD"])


def test_replicas_believe_forwarded_headers_from_nginx_only(project: Path, tmp_path: Path) -> None:
    nginx_address = service("nginx")["networks"]["backend"]["ipv4_address"]
    subnet = ipaddress.ip_network(compose()["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    for name in PROXIES:
        trusted = bff_settings(replica_env(project, name)).trusted_proxies
        assert trusted == [nginx_address]
        assert ipaddress.ip_address(service(name)["networks"]["backend"]["ipv4_address"]) in subnet
    assert ipaddress.ip_address(nginx_address) in subnet
    # deploy/.env cannot loosen that: compose's own value wins over the env file's.
    loose = deploy_copy(tmp_path, {"BFF_TRUSTED_PROXIES": "0.0.0.0/0"})
    assert bff_settings(replica_env(loose)).trusted_proxies == [nginx_address]


def test_docker_waits_longer_than_the_drain_before_killing() -> None:
    for name in (*PROXIES, "nginx"):
        assert seconds(service(name)["stop_grace_period"]) > GRACEFUL_SHUTDOWN_SECONDS
    assert service("nginx")["stop_signal"] == "SIGQUIT"  # nginx's graceful stop; SIGTERM cuts streams


def test_replicas_are_locked_down_and_health_checked_on_a_real_route() -> None:
    for name in PROXIES:
        proxy = service(name)
        assert proxy["read_only"] is True
        assert proxy["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in proxy["security_opt"]
        check = " ".join(proxy["healthcheck"]["test"])
        path = re.search(rf"127\.0\.0\.1:{app_port()}(/\w+)", check)
        assert path is not None and path.group(1) in app_paths()


def test_nginx_is_the_only_published_service_and_starts_after_healthy_replicas() -> None:
    nginx = service("nginx")

    assert [name for name, svc in compose()["services"].items() if "ports" in svc] == ["nginx"]
    assert {dep["condition"] for dep in nginx["depends_on"].values()} == {"service_healthy"}
    assert set(nginx["depends_on"]) == set(PROXIES)
    source, target = nginx["volumes"][0].split(":")[:2]
    assert (DEPLOY / source).resolve() == DEPLOY / "nginx.conf"
    assert target == "/etc/nginx/nginx.conf"
    published = nginx["ports"][0].split(":")[-1]
    # One port: a default server that answers no unknown Host, and the app's, by server_name.
    assert nginx_values("listen") == [[published, "default_server"], [published]]
    assert nginx_values("server_name") == [["localhost", "127.0.0.1"]]


# Redis as both setups run it, on a real redis-server


@contextmanager
def container_redis(command: list[str], env: Mapping[str, str], workdir: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Runs a container's Redis command line here. `redis-server`, `redis-cli` and the image's
    `docker-entrypoint.sh` are stand-ins on PATH: the real ones, with the same arguments plus a free
    loopback port and a data directory. Yields the port and the environment (PATH included) to run the
    health check in."""
    server, cli = require_tool("redis-server"), require_tool("redis-cli")
    port = free_port()
    stand_ins = workdir / "bin"
    stand_ins.mkdir(parents=True)
    scripts = {
        "redis-server": f'exec {server} "$@" --port {port} --bind 127.0.0.1 --dir {workdir} --save ""',
        "redis-cli": f'exec {cli} -p {port} "$@"',
        "docker-entrypoint.sh": 'exec "$@"',  # the image's, for a non-root user: it runs its arguments
    }
    for name, body in scripts.items():
        (stand_ins / name).write_text(f"#!/bin/sh\n{body}\n")
        (stand_ins / name).chmod(0o755)
    environment = {**env, "PATH": f"{stand_ins}:{os.environ['PATH']}"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield port, environment
    finally:
        process.terminate()
        process.wait(10)


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def health_check(command: str, environment: Mapping[str, str]) -> int:
    return subprocess.run(["sh", "-c", command], env=environment, capture_output=True, timeout=10).returncode


def assert_locked_and_never_evicting(port: int, password: str, environment: Mapping[str, str], check: str) -> None:
    """The password is required, the health check says so, and the policy is noeviction."""
    client = redis.Redis(port=port, password=password)
    eventually(lambda: answers(client), "redis answering")
    once = Retry(NoBackoff(), 0)  # a refusal is the answer, not something to retry
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, retry=once).set("anyone", "x")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, password="not-" + password, retry=once).ping()
    assert health_check(check, environment) == 0
    assert health_check(check, {**environment, "REDISCLI_AUTH": "wrong"}) != 0  # NOAUTH is not healthy
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()


def test_full_compose_redis_refuses_writes_with_503_and_signs_nobody_out(
    project: Path, emulator: ServerProcess, tmp_path: Path
) -> None:
    redis_service = compose_config(project)["services"]["redis"]
    password = OPERATOR_SECRETS["REDIS_PASSWORD"]
    with container_redis(redis_service["command"], redis_service["environment"], tmp_path) as (port, environment):
        assert_locked_and_never_evicting(port, password, environment, redis_service["healthcheck"]["test"][1])
        client = redis.Redis(port=port, password=password)
        assert int(str(client.config_get("maxmemory")["maxmemory"])) == memory_bytes("256mb")
        url = urlsplit(replica_env(project)["BFF_STORAGE_URL"])
        storage_url = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        proxy = start_proxy(emulator.url, BFF_STORAGE_URL=storage_url)
        try:
            with guest_of(proxy.url) as signed_in:
                # Full: a little above what is used now, then filled past it.
                client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 100_000)
                client.eval("for i = 1, 3000 do redis.call('SET', 'fill:' .. i, string.rep('x', 100)) end", 0)
                with pytest.raises(redis.exceptions.OutOfMemoryError):
                    client.set("one-more", "x")

                still = signed_in.get("/auth/session")
                relay = signed_in.post("/api/workflows/tutor/stream", json={"message": "fractions"})
                with browser(proxy.url) as newcomer:
                    sign_in = newcomer.post("/auth/guest")
        finally:
            proxy.stop()
        evicted = int(client.info("stats")["evicted_keys"])
        client.close()

    assert still.status_code == 200  # the session is still there: nothing was evicted to make room
    for refused in (relay, sign_in):
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "storage_unavailable"
        assert "Retry-After" in refused.headers
    assert evicted == 0


# nginx


def test_nginx_streams_unbuffered_with_timeouts_beyond_the_longest_stream() -> None:
    longest_stream = Settings.model_fields["max_stream_seconds"].default

    assert nginx_values("proxy_buffering") == [["off"]]
    assert nginx_values("gzip") == [["off"]]
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        [[timeout]] = nginx_values(name)
        assert seconds(timeout) > max(300, longest_stream)


def test_nginx_sets_forwarded_headers_and_balances_over_both_replicas() -> None:
    headers = {args[0].lower(): args[1] for args in nginx_values("proxy_set_header")}

    assert headers["x-forwarded-for"] == "$remote_addr"
    assert headers["x-forwarded-proto"] == "$scheme"
    assert headers["connection"] == '""'  # keep-alive to the replicas
    assert nginx_values("proxy_http_version") == [["1.1"]]
    assert [args[0] for args in nginx_values("server") if args] == [f"{name}:{app_port()}" for name in PROXIES]


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    config = (DEPLOY / "nginx.conf").read_text()
    for name in PROXIES:  # compose's service names do not resolve here
        config = config.replace(f"server {name}:", "server 127.0.0.1:")
    (tmp_path / "nginx.conf").write_text(config)

    result = subprocess.run(
        [
            nginx,
            "-t",
            "-q",
            "-p",
            str(tmp_path),
            "-c",
            str(tmp_path / "nginx.conf"),
            "-g",
            f"pid {tmp_path}/nginx.pid;",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr


@contextmanager
def nginx_in_front_of(app_url: str, workdir: Path) -> Iterator[str]:
    """deploy/nginx.conf running on a free loopback port, both replicas pointed at `app_url`."""
    nginx = require_tool("nginx")
    port = free_port()
    config = (DEPLOY / "nginx.conf").read_text().replace("listen 8080", f"listen 127.0.0.1:{port}")
    for name in PROXIES:
        config = config.replace(f"server {name}:{app_port()};", f"server {app_url.removeprefix('http://')};")
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # not the packaged paths: any user can run it
    temp = "".join(f"{kind}_temp_path {workdir}/{kind};" for kind in kinds)
    (workdir / "nginx.conf").write_text(config.replace("http {", "http {" + temp, 1))
    command = [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    server = subprocess.Popen([*command, "-g", f"daemon off; pid {workdir}/nginx.pid;"])
    try:
        eventually(lambda: _accepts(port), "nginx listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_through_nginx_the_app_streams_but_its_metrics_stay_inside(emulator: ServerProcess, tmp_path: Path) -> None:
    proxy = start_proxy(emulator.url)
    try:
        # As a browser on the edge's origin sends them: the app checks Origin against the Host it sees.
        same_origin = {"Sec-Fetch-Site": "same-origin"}
        with nginx_in_front_of(proxy.url, tmp_path) as edge, browser(edge, headers=same_origin) as client:
            client.headers["Origin"] = edge
            client.post("/auth/guest").raise_for_status()
            stream = client.post("/api/workflows/tutor/stream", json={"message": "fractions"})
            edge_metrics = client.get("/metrics")
            with pytest.raises(httpx.RemoteProtocolError):  # nginx's 444: no answer at all
                httpx.get(edge + "/healthz", headers={"Host": "evil.example"})
        direct_metrics = httpx.get(f"{proxy.url}/metrics")
    finally:
        proxy.stop()

    assert stream.status_code == 200
    assert stream.text == generate_text("wf_tutor", {"message": "fractions"})
    assert direct_metrics.status_code == 200 and "bff_open_streams" in direct_metrics.text
    assert edge_metrics.status_code == 404 and "bff_" not in edge_metrics.text


# Kubernetes


def test_every_manifest_is_in_the_kustomization_and_parses() -> None:
    listed = set(kustomization()["resources"])

    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {doc["kind"] for doc in k8s_documents()}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Secret",
        "ConfigMap",
        "NetworkPolicy",
    } <= kinds


def test_everything_goes_into_one_namespace_that_the_manifests_create() -> None:
    namespace = kustomization().get("namespace")

    assert namespace
    assert k8s("Namespace", namespace)
    assert [doc["metadata"]["name"] for doc in k8s_documents() if "namespace" in doc["metadata"]] == []
    assert {doc["metadata"].get("namespace") for doc in rendered_manifests() if doc["kind"] != "Namespace"} == {
        namespace
    }
    # The commands that create the Secrets by hand name it too.
    commands = re.findall(r"kubectl create secret .*", (K8S / "secret.yaml").read_text())
    assert commands and all(f"-n {namespace}" in command for command in commands)


def test_the_manifests_match_the_kubernetes_api_schemas() -> None:
    kubernetes_validate = require_module("kubernetes_validate")

    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for document in rendered_manifests():
            try:  # strict: a misspelt or misplaced field is an error, not ignored
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{document['kind']} {document['metadata']['name']} on {version}: {error.message}")


def test_the_deployment_probes_routes_the_app_has() -> None:
    container = bff_container()

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert set(http_probe_paths(container)) <= app_paths()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == app_port()


def test_the_deployment_is_locked_down_and_sized() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    container = bff_container()
    security = container["securityContext"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_the_pod_is_given_time_to_deregister_and_drain_before_it_is_killed() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    command = bff_container()["lifecycle"]["preStop"]["exec"]["command"]

    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + GRACEFUL_SHUTDOWN_SECONDS


def test_configmap_secrets_and_env_make_valid_complete_settings_once_the_placeholders_are_replaced() -> None:
    environment = container_environment(bff_container())

    settings = bff_settings(environment)

    assert settings.missing_for_serve() == []
    url = urlsplit(settings.storage_url)
    assert storage_scheme(settings.storage_url) in REDIS_SCHEMES  # replicas must share state
    assert (url.hostname, url.port) == (k8s("Service", "redis")["metadata"]["name"], 6379)
    assert url.password == secret_data("redis")["password"] == redis_container_environment()["REDISCLI_AUTH"]
    config = k8s("ConfigMap", "workflow-bff")["data"]
    assert not set(config) & {"BFF_API_KEY", "BFF_SESSION_SECRETS", "BFF_STORAGE_URL"}
    # As shipped, every secret is a placeholder, and serve refuses to start with them.
    for name in ("workflow-bff", "redis"):
        assert all(value.startswith("REPLACE_ME") for value in secret_data(name, operator=False).values())
    shipped = container_environment(bff_container(), operator=False)
    with pytest.raises(ConfigError, match="BFF_API_KEY"):
        bff_settings(shipped)


def redis_container_environment(*, operator: bool = True) -> dict[str, str]:
    return container_environment(redis_container(), operator=operator)


def test_only_workflow_bff_pods_can_reach_redis() -> None:
    policy = k8s("NetworkPolicy", "redis")["spec"]
    redis_pods = k8s("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    bff_pods = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    redis_port = next(port["containerPort"] for port in redis_container()["ports"] if port["name"] == "redis")

    assert policy["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert not policy["podSelector"]["matchLabels"].items() <= bff_pods.items()
    assert k8s("Service", "redis")["spec"]["selector"].items() <= redis_pods.items()
    assert "Ingress" in policy["policyTypes"]
    [rule] = policy["ingress"]
    # A pod selector alone: pods of this namespace with workflow-bff's labels, nothing else.
    assert rule["from"] == [{"podSelector": {"matchLabels": k8s("Deployment")["spec"]["selector"]["matchLabels"]}}]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= bff_pods.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": redis_port}]


def test_kubernetes_redis_requires_the_secret_password_and_never_evicts(tmp_path: Path) -> None:
    spec = redis_container()
    command = [*spec.get("command", []), *spec["args"]]
    check = spec["readinessProbe"]["exec"]["command"]
    assert check[:2] == ["sh", "-c"]
    limit = memory_bytes(spec["resources"]["limits"]["memory"])

    # With the placeholder still in the Secret, Redis does not start at all.
    placeholder = redis_container_environment(operator=False)
    refused = subprocess.run(command, env={**placeholder, "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert refused.returncode != 0 and "redis Secret" in refused.stderr

    environment = redis_container_environment()
    with container_redis(command, environment, tmp_path) as (port, health):
        assert_locked_and_never_evicting(port, environment["REDISCLI_AUTH"], health, check[2])
        client = redis.Redis(port=port, password=environment["REDISCLI_AUTH"])
        maxmemory = int(str(client.config_get("maxmemory")["maxmemory"]))
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    assert 0 < maxmemory <= limit // 2  # room for Redis itself and the fork that rewrites the AOF


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    deployment = k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb, hpa = k8s("PodDisruptionBudget"), k8s("HorizontalPodAutoscaler")

    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert k8s("Service")["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "workflow-bff"}
    # A node drain can always proceed, and never takes the last replica.
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_ingress_streams_unbuffered_with_long_timeouts() -> None:
    annotations = k8s("Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"

    assert annotations[prefix + "proxy-buffering"] == "off"
    assert int(annotations[prefix + "proxy-read-timeout"]) > 300
    assert int(annotations[prefix + "proxy-send-timeout"]) > 300
    for path in k8s("Ingress")["spec"]["rules"][0]["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend["name"] == k8s("Service")["metadata"]["name"]
        assert backend["port"]["name"] in {port["name"] for port in k8s("Service")["spec"]["ports"]}


def ingress_routes(path: str) -> bool:
    """Whether the Ingress sends `path` to the app (Kubernetes matches Prefix paths element-wise)."""
    for rule in k8s("Ingress")["spec"]["rules"][0]["http"]["paths"]:
        if rule["pathType"] == "Exact" and path == rule["path"]:
            return True
        if rule["pathType"] == "Prefix" and (path == rule["path"] or path.startswith(rule["path"].rstrip("/") + "/")):
            return True
    return False


def test_the_ingress_routes_every_browser_route_and_nothing_for_operations() -> None:
    operations = {"/metrics", "/healthz", "/readyz"}  # scraped and probed on each pod (bff-security R24)

    assert {path for path in app_paths() if ingress_routes(path)} == app_paths() - operations


# BFF_TRUSTED_PROXIES: the check deploy/README.md tells operators to make


def signed_in_from(url: str, address: str) -> int:
    with browser(url, headers={"X-Forwarded-For": address}) as client:
        return client.post("/auth/guest").status_code


def client_ips(server: ServerProcess) -> list[str]:
    lines = [parse_json(line) for line in server.logs]
    return [line["client_ip"] for line in lines if line.get("audit") == "session.created"]


def test_the_readme_check_for_trusted_proxies_tells_a_right_cidr_from_a_wrong_one(emulator: ServerProcess) -> None:
    guests = ["203.0.113.7", "198.51.100.23", "192.0.2.99"]
    login_limit = {"BFF_RATE_LIMITS": "login=2/minute"}  # per client IP

    # Here the "ingress controller" is this test, connecting from 127.0.0.1.
    right = start_proxy(emulator.url, BFF_TRUSTED_PROXIES="127.0.0.1/32", **login_limit)
    try:
        statuses = [signed_in_from(right.url, address) for address in guests]
        eventually(lambda: len(client_ips(right)) == 3, "three session.created lines")
        right_ips = client_ips(right)
    finally:
        right.stop()
    wrong = start_proxy(emulator.url, BFF_TRUSTED_PROXIES="10.0.0.0/8", **login_limit)
    try:
        wrong_statuses = [signed_in_from(wrong.url, address) for address in guests]
        eventually(lambda: len(client_ips(wrong)) == 2, "two session.created lines")
        wrong_ips = client_ips(wrong)
    finally:
        wrong.stop()

    # Right: each guest's own address in the log, and each its own per-IP sign-in budget.
    assert right_ips == guests and statuses == [200, 200, 200]
    # Wrong: the log shows the proxy's address for everyone, who then share one budget.
    assert wrong_ips == ["127.0.0.1", "127.0.0.1"] and wrong_statuses == [200, 200, 429]
    # And that log line, with that field, is the check deploy/README.md tells operators to make.
    guide = (DEPLOY / "README.md").read_text()
    section = guide[guide.index("### Picking BFF_TRUSTED_PROXIES") :]
    assert "session.created" in section and "client_ip" in section
