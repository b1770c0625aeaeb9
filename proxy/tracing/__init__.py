"""OpenTelemetry tracing (issue 19): whether it is on, and nothing else unless it is.

Tracing is off unless the standard variables ask for it: `OTEL_SDK_DISABLED` is not `true`, and
`OTEL_TRACES_EXPORTER` names `otlp` or `console`, or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). Off, this module is all there is:
the SDK is never imported, no middleware is added, and the code on a request's path holds `None`
where it would hold a tracer (one `is None` check). On, `spans.py` builds the provider, and the SDK
and its exporters read the rest of the `OTEL_*` variables themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.settings import Settings
    from proxy.tracing.spans import Tracing

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
# Probes and scrapes come every few seconds to every replica: no traces of them, unless the operator
# names the URLs to leave out (OTEL_PYTHON_ASGI_EXCLUDED_URLS, OTEL_PYTHON_EXCLUDED_URLS: regexes).
DEFAULT_EXCLUDED_URLS = "/healthz$,/readyz$,/metrics$"


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty when tracing is off. ValueError for an
    exporter or OTLP protocol this service does not ship."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if "none" in named:
        return []
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not named:
        named = ["otlp"] if endpoint else []
    unknown = sorted(set(named) - set(EXPORTERS))
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not supported; use otlp or console")
    if "otlp" in named and otlp_protocol(environ) not in PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: use {' or '.join(PROTOCOLS)}")
    return list(dict.fromkeys(named))


def otlp_protocol(environ: Mapping[str, str]) -> str:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (protocol or "http/protobuf").strip().lower()


def excluded_urls(environ: Mapping[str, str]) -> str:
    named = environ.get("OTEL_PYTHON_ASGI_EXCLUDED_URLS") or environ.get("OTEL_PYTHON_EXCLUDED_URLS")
    return named or DEFAULT_EXCLUDED_URLS


def open_tracing(settings: Settings, environ: Mapping[str, str]) -> Tracing | None:
    """The app's tracing, or None when the environment does not ask for it (then nothing is imported)."""
    exporters = exporter_names(environ)
    if not exporters:
        return None
    from proxy.tracing.spans import Tracing  # the SDK is imported here, and only here

    return Tracing.build(settings, exporters, otlp_protocol(environ), excluded_urls=excluded_urls(environ))
