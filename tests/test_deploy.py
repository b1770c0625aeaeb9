"""deploy/: Docker cannot run here, so the Dockerfile, compose, nginx and Kubernetes files are read with
parsers and checked against the app itself: its settings, its routes, its port and its drain time.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import yaml
from starlette.routing import Route

from proxy.app import create_app
from proxy.cli import GRACEFUL_SHUTDOWN_SECONDS, load_settings
from proxy.emulator import generate_text
from proxy.settings import Settings
from proxy.storage import REDIS_SCHEMES, storage_scheme
from tests.conftest import require_tool
from tests.servers import ROOT, ServerProcess, browser, eventually, free_port, start_proxy

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_ENV = {  # what an operator puts in deploy/.env
    "BFF_API_KEY": "sk_live_example",
    "BFF_SESSION_SECRETS": "b7bd55c11b781b0ccc43aa6e57f9dadf0660e9d1d4e27e09",
    "BFF_WORKFLOWS": "tutor=wf_abc123",
}
PROXIES = ("proxy-1", "proxy-2")
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - inside a container, the port is reachable only as published


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
    loaded = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    found = compose()["services"][name]
    assert isinstance(found, dict)
    return found


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?error}`."""

    def one(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise AssertionError(f"compose requires {name}: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def compose_environment(name: str) -> dict[str, str]:
    return {key: interpolate(str(value), COMPOSE_ENV) for key, value in service(name)["environment"].items()}


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


def bff_container() -> dict[str, Any]:
    containers = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = next(c for c in containers if c["name"] == "workflow-bff")
    return found


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


def test_the_image_is_a_multi_stage_slim_python_build() -> None:
    stages = [args.split()[0] for name, args in dockerfile() if name == "FROM"]

    assert len(stages) >= 2
    assert set(stages) == {"python:3.11-slim"}
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final_stage()


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


# docker-compose


def test_compose_runs_redis_two_replicas_and_nginx() -> None:
    assert set(compose()["services"]) == {"redis", *PROXIES, "nginx"}
    for name in PROXIES:
        proxy = service(name)
        assert proxy["build"]["context"] == ".."
        assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_redis_is_health_checked_private_and_awaited_by_the_replicas() -> None:
    redis = service("redis")

    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis
    assert "--appendonly" in redis["command"]
    for name in PROXIES:
        assert service(name)["depends_on"]["redis"]["condition"] == "service_healthy"
        url = compose_environment(name)["BFF_STORAGE_URL"]
        assert storage_scheme(url) in REDIS_SCHEMES
        assert url.split("://")[1].split(":")[0] == "redis"


def test_every_replica_gets_valid_complete_settings_from_compose() -> None:
    for name in PROXIES:
        settings = settings_from(compose_environment(name))
        assert settings.missing_for_serve() == []
    assert compose_environment(PROXIES[0]) == compose_environment(PROXIES[1])


def test_replicas_believe_forwarded_headers_from_nginx_only() -> None:
    nginx_address = service("nginx")["networks"]["backend"]["ipv4_address"]
    subnet = ipaddress.ip_network(compose()["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    for name in PROXIES:
        trusted = settings_from(compose_environment(name)).trusted_proxies
        assert trusted == [nginx_address]
        assert ipaddress.ip_address(service(name)["networks"]["backend"]["ipv4_address"]) in subnet
    assert ipaddress.ip_address(nginx_address) in subnet


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
    assert nginx_values("listen") == [[published]]


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
    config = (DEPLOY / "nginx.conf").read_text().replace("listen 8080;", f"listen 127.0.0.1:{port};")
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
        direct_metrics = httpx.get(f"{proxy.url}/metrics")
    finally:
        proxy.stop()

    assert stream.status_code == 200
    assert stream.text == generate_text("wf_tutor", {"message": "fractions"})
    assert direct_metrics.status_code == 200 and "bff_open_streams" in direct_metrics.text
    assert edge_metrics.status_code == 404 and "bff_" not in edge_metrics.text


# Kubernetes


def test_every_manifest_is_in_the_kustomization_and_parses() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])

    assert listed == {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = {doc["kind"] for doc in k8s_documents()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Secret", "ConfigMap"} <= kinds


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


def test_configmap_and_secret_make_valid_complete_settings_with_placeholder_secrets() -> None:
    container = bff_container()
    sources = {next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]}
    config = k8s("ConfigMap", sources["configMapRef"])["data"]
    secret = k8s("Secret", sources["secretRef"])["stringData"]

    settings = settings_from({**config, **secret})

    assert settings.missing_for_serve() == []
    assert storage_scheme(settings.storage_url) in REDIS_SCHEMES  # replicas must share state
    assert all(value.startswith("REPLACE_ME") for value in secret.values())
    assert not set(config) & {"BFF_API_KEY", "BFF_SESSION_SECRETS"}


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
