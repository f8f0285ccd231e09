"""Real `pgqueue worker` processes for tests: started as a supervisor would, signalled as one does.

Each worker runs in its own session (so its own process group, like a service under
systemd or a command typed in a terminal), in the test's temporary directory, with its
output in a file the test can wait on line by line. Cleanup kills the whole group, so
neither the worker nor a child it left behind outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psycopg

from pgqueue.testing import wait_for
from tests.conftest import pgqueue_command, subprocess_environment


class WorkerProcess:
    """One `pgqueue worker` subprocess and its output."""

    def __init__(self, process: subprocess.Popen[bytes], output: Path) -> None:
        self.process = process
        self.output_path = output

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def wait_for_output(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until `text` has appeared `count` times in the worker's output."""
        try:
            wait_for(
                lambda: self.output().count(text) >= count or self.process.poll() is not None,
                timeout=timeout,
                what=f"{text!r} {count} time(s) in the worker's output",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; the worker's output:\n{self.output()}") from None
        if self.output().count(text) < count:
            raise AssertionError(
                f"worker exited ({self.process.returncode}) before printing {text!r}:\n{self.output()}"
            )

    def signal_group(self, signum: int) -> None:
        """Signal the worker's whole process group, as a terminal's Ctrl-C or a supervisor does."""
        os.killpg(self.process.pid, signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the worker to exit; its exit status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} did not exit within {timeout:g}s:\n{self.output()}"
            ) from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        """Pids of the worker's live child processes (its process pool)."""
        return [pid for pid in group_members(self.pid) if pid != self.pid]

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes in process group `group`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command's ")": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def process_gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class WorkerProcesses:
    """Starts `pgqueue worker` processes for one test and kills what is left at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[WorkerProcess] = []

    def start(
        self,
        dsn: str,
        *arguments: str,
        app: str = "tests.sample_app:app",
        environment: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """`pgqueue --dsn DSN worker APP ARGUMENTS…`; quick polls and reconnects unless overridden."""
        output = self.directory / f"worker-{len(self.started)}.out"
        settings = {
            "PGQUEUE_POLL_INTERVAL": "0.2",
            "PGQUEUE_RESCUE_INTERVAL": "0.5",
            "PGQUEUE_RECONNECT_MAX_DELAY": "0.5",
            "PGQUEUE_TEST_LOG": str(self.directory / "executions.log"),
            **(environment or {}),
        }
        with output.open("wb") as sink:
            process = subprocess.Popen(
                pgqueue_command("--dsn", dsn, "worker", app, *arguments),
                cwd=self.directory,
                env=subprocess_environment(**settings),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, output)
        self.started.append(worker)
        return worker

    def executions(self) -> list[str]:
        """Lines the sample app's tasks wrote to $PGQUEUE_TEST_LOG."""
        log = self.directory / "executions.log"
        return log.read_text().splitlines() if log.exists() else []

    def cleanup(self) -> None:
        for worker in self.started:
            worker.kill_group()


def backends(dsn: str, application_name: str) -> list[tuple[int, str, str]]:
    """(pid, state, last query) of each connection to `dsn`'s database with that application_name."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "select pid, state, query from pg_stat_activity"
            " where datname = current_database() and application_name = %s",
            (application_name,),
        ).fetchall()
    return [(int(pid), str(state), str(query)) for pid, state, query in rows]


def listening(dsn: str) -> list[int]:
    """Pids of the worker's LISTEN sessions that have run their LISTEN (not merely connected)."""
    return [
        pid
        for pid, state, query in backends(dsn, "pgqueue-listen")
        # after `listen pgqueue_jobs`, the only statement the session runs is its probe
        if state == "idle" and query in ("listen pgqueue_jobs", "select 1")
    ]


def claim_session_quiet(dsn: str, seconds: float) -> bool:
    """True when the worker's one claim session has run no statement for `seconds`."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        sessions = connection.execute(
            "select state, clock_timestamp() - state_change > make_interval(secs => %s)"
            " from pg_stat_activity"
            " where datname = current_database() and application_name = 'pgqueue-claim'",
            (seconds,),
        ).fetchall()
    return len(sessions) == 1 and sessions[0] == ("idle", True)
