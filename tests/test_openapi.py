"""`GET /openapi.json` describes exactly the routes the service serves (CONTRACT B7)."""

from __future__ import annotations

import httpx

from proxy.app import create_app
from proxy.openapi import OPERATIONS, served_operations
from proxy.settings import Settings
from tests.servers import ServerProcess, proxy_env


def routing_table() -> set[tuple[str, str]]:
    """The routes an app built from the test proxy's settings serves."""
    env = {k.removeprefix("BFF_").lower(): v for k, v in proxy_env("http://127.0.0.1:9").items()}
    return served_operations(create_app(Settings(_env_file=None, **env)).routes)  # type: ignore[arg-type]


def test_the_document_lists_exactly_the_served_routes(proxy: ServerProcess) -> None:
    served = routing_table()

    document = httpx.get(proxy.url + "/openapi.json").json()

    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == served
    assert served <= set(OPERATIONS), f"undocumented routes: {served - set(OPERATIONS)}"
    assert document["openapi"] == "3.1.0"


def test_every_state_changing_operation_documents_the_csrf_header_and_its_errors(proxy: ServerProcess) -> None:
    document = httpx.get(proxy.url + "/openapi.json").json()

    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "post":
                names = {parameter["name"] for parameter in operation["parameters"]}
                assert "X-CSRF" in names, path
                assert "403" in operation["responses"], path
