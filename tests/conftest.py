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
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from pgqueue import App
from pgqueue.settings import Settings
from pgqueue.testing import create_database, create_migrated_database, database_dsn, drop_database

if TYPE_CHECKING:
    from tests.processes import WorkerProcesses

REPOSITORY = Path(__file__).resolve().parent.parent
# Read once, before the autouse fixture below clears every PGQUEUE_* variable.
TEST_SERVER_DSN = os.environ.get("PGQUEUE_TEST_DSN")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test sees the developer's PGQUEUE_* variables or .env, nor leaks a worker thread.

    Each test runs in its own temporary directory, so a `.env` in the checkout (or one a
    test writes) never reaches another test, and neither do files an embedded server
    or a subprocess leaves behind.
    """
    for name in list(os.environ):
        if name.startswith("PGQUEUE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    leaked = [thread.name for thread in threading.enumerate() if thread.name == "pgqueue-test-worker"]
    assert not leaked, f"a worker thread outlived its test: {leaked}"


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
    if TEST_SERVER_DSN:
        yield TEST_SERVER_DSN
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as container:
            yield container.get_connection_url()
        return
    from pgqueue.embedded import embedded_dsn, stop_embedded

    directory = Path(tempfile.mkdtemp(prefix="pgqueue-tests-"))
    try:
        yield embedded_dsn(directory / "postgres")
    finally:
        stop_embedded(directory / "postgres")
        shutil.rmtree(directory, ignore_errors=True)


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
    # the production lease (30 s): only lease tests shorten it, through `lease_settings`
    return Settings(dsn=dsn, poll_interval=0.5, shutdown_grace=5.0)


@pytest.fixture
def lease_settings(dsn: str) -> Settings:
    """Short leases and quick rescue sweeps, for tests about leases expiring."""
    return Settings(dsn=dsn, lease_seconds=2.0, rescue_interval=0.5, poll_interval=0.5, shutdown_grace=5.0)


@pytest.fixture
def app(settings: Settings) -> Iterator[App]:
    application = App(settings)
    yield application
    application.close()


@pytest.fixture
def new_app(dsn: str) -> Iterator[Callable[..., App]]:
    """Builds Apps on this test's database with the given settings; closes them all afterwards."""
    apps: list[App] = []

    def build(**settings: Any) -> App:
        app = App(Settings(**{"dsn": dsn, **settings}))
        apps.append(app)
        return app

    try:
        yield build
    finally:
        for app in apps:
            app.close()


@pytest.fixture
def connection(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def sample(dsn: str) -> Iterator[App]:
    """The shared sample app (tests/sample_app.py) on this test's database, closed afterwards."""
    from tests import sample_app

    sample_app.app.configure(Settings(dsn=dsn, poll_interval=0.1))
    try:
        yield sample_app.app
    finally:
        sample_app.app.close()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Real `pgqueue worker` processes (see tests/processes.py), killed with their groups at the end."""
    from tests.processes import WorkerProcesses

    started = WorkerProcesses(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


def pgqueue_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pgqueue", *arguments]


def subprocess_environment(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this one (PGQUEUE_* already cleared), with
    the checkout importable (subprocesses run in the test's temporary directory)."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
