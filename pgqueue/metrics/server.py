"""The HTTP endpoint of a worker or of the exporter: `/metrics` for Prometheus, `/health` for probes.

`/metrics` is prometheus-client's own WSGI app; `/health` answers JSON with 200
(healthy, degraded) or 503 (critical). prometheus-client's `start_http_server`
serves nothing but metrics, so the two share a small WSGI router on the standard
library's server, in a daemon thread.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from ..health import Health

log = logging.getLogger("pgqueue")

_REASONS = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr is noise; Prometheus records failed scrapes


class MetricsServer:
    """Serves `registry` on `host:port` (port 0: any free port, see `.port`) until `close()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int,
        host: str = "127.0.0.1",
        health: Callable[[], Health] | None = None,
    ) -> None:
        metrics = make_wsgi_app(registry)
        health = _Cached(health) if health is not None else None

        def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path in ("/metrics", "/"):
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            if path == "/health" and health is not None:
                verdict = health()
                body = json.dumps(verdict.as_json()).encode()
                start_response(
                    _REASONS[verdict.http_status],
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            start_response(_REASONS[404], [("Content-Type", "text/plain")])
            return [b"not found: try /metrics or /health\n"]

        self._server = make_server(host, port, route, server_class=_Server, handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pgqueue-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Cached:
    """The last verdict for `seconds`, asked for by one request at a time: a flood of
    /health requests costs the database one connection every few seconds, never one
    per request."""

    def __init__(self, ask: Callable[[], Health], seconds: float = 2.0) -> None:
        self._ask = ask
        self._seconds = seconds
        self._lock = threading.Lock()
        self._verdict: Health | None = None
        self._at = 0.0

    def __call__(self) -> Health:
        with self._lock:
            now = time.monotonic()
            if self._verdict is None or now - self._at >= self._seconds:
                self._verdict, self._at = self._ask(), now
            return self._verdict
