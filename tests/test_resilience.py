"""Real `pgqueue worker` processes against a real server that restarts or loses its network.

A restart or a network cut pauses a worker and never ends it; outcomes of jobs that
finished meanwhile are recorded once the database is back, unless the job was rescued
in between, in which case the late outcome is ignored and the rescued attempt wins;
LISTEN comes back after a restart, so new jobs still start at once.

No test sleeps and hopes: handlers (tests/resilience_app.py) wait for gate files the
test creates, and every wait is on a condition (a line in the executions log or in a
worker's output, a backend in pg_stat_activity, a job's state) with a generous timeout.
"""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest

from pgqueue import App, Job, Settings, migrate
from pgqueue.testing import job_states
from tests import resilience_app
from tests.clusters import OwnCluster
from tests.processes import WorkerProcess, WorkerProcesses, backends, claim_session_quiet, listening
from tests.resilience_app import gate_path

pytestmark = pytest.mark.slow

APP = "tests.resilience_app:app"
# Waits are generous: on a loaded 2-core machine a worker may take seconds to start.
TIMEOUT = 60.0


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
        self.replies_cut = False  # requests still reach the server, its answers are lost
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.cut_now = True
        self.generation += 1

    def cut_replies(self) -> None:
        """Lose only what the server sends: statements still arrive and commit."""
        self.replies_cut = True
        self.generation += 1

    def restore(self) -> None:
        self.generation += 1
        self.cut_now = False
        self.replies_cut = False

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone does not
        self.listener.close()
        # Links the cut left dead would otherwise hold server connections open (those that
        # never got their startup packet through wait out authentication_timeout).
        for link in self.sockets:
            with contextlib.suppress(OSError):
                link.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()  # the server refused: so does the proxy, and it goes on
                continue
            self.sockets += [client, upstream]
            generation = self.generation
            for source, sink, reply in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, generation, reply), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, generation: int, reply: bool) -> None:
        while not self.closing:
            try:
                ready, _, _ = select.select([source], [], [], 0.2)
                if not ready:
                    continue
                data = source.recv(65536)
            except (OSError, ValueError):  # closed by close()
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if reply and self.replies_cut:
                continue  # the answer is lost on the way back
            if self.cut_now or (generation != self.generation and not self.replies_cut):
                continue  # swallowed: the link is dead
            with contextlib.suppress(OSError):
                sink.sendall(data)


@dataclass(frozen=True)
class Execution:
    """One line of the executions log that tests/resilience_app.py writes."""

    event: str  # "start" or "end"
    job_id: int
    attempt: int
    pid: int


def executions(
    workers: WorkerProcesses, event: str | None = None, job_id: int | None = None
) -> list[Execution]:
    """The executions log of this test's workers; only the lines of `event` or `job_id` when given."""
    lines = [
        Execution(kind, int(job), int(attempt), int(pid))
        for kind, job, attempt, pid in map(str.split, workers.executions())
    ]
    return [line for line in lines if event in (None, line.event) and job_id in (None, line.job_id)]


def executed_ids(workers: WorkerProcesses, event: str) -> list[int]:
    """Ids of the jobs with an `event` line in the executions log, sorted, once per line."""
    return sorted(line.job_id for line in executions(workers, event))


def wait_until(condition: Callable[[], bool], what: str, *watched: WorkerProcess) -> None:
    """Wait for `condition`, failing at once if a watched worker exits; their output on failure."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        exited = not all(worker.alive() for worker in watched)
        if exited or time.monotonic() > deadline:
            problem = "a worker exited" if exited else f"timed out after {TIMEOUT:g}s"
            outputs = "\n".join(f"--- worker {worker.pid}:\n{worker.output()}" for worker in watched)
            raise AssertionError(f"{problem} waiting for {what}:\n{outputs}")
        time.sleep(0.05)  # the interval between two looks, not a guess at how long anything takes


def wait_for_success(dsn: str, ids: list[int], *watched: WorkerProcess) -> None:
    """Wait until every job in `ids` has succeeded (any other final state fails the test)."""

    def ended() -> bool:
        states = job_states(dsn, ids)
        return len(states) == len(ids) and set(states.values()) <= {"succeeded", "dead", "cancelled"}

    wait_until(ended, f"jobs {ids} to end", *watched)
    assert job_states(dsn, ids) == dict.fromkeys(ids, "succeeded")


def stored_job(dsn: str, job_id: int) -> Job:
    """The job as a user looking it up sees it (on a connection of its own: no pool to outlive a restart)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        return resilience_app.app.get_job(job_id, connection)


def stop_cleanly(worker: WorkerProcess) -> str:
    """SIGTERM, as a supervisor sends it; the worker must exit 0 having logged no error. Its output."""
    worker.signal_group(signal.SIGTERM)
    status = worker.wait(TIMEOUT)
    output = worker.output()
    assert status == 0, output
    failures = [line for line in output.splitlines() if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
    assert not failures, output
    return output


def open_gates(directory: Path) -> str:
    """A gates directory whose first attempts run straight through."""
    directory.mkdir()
    gate_path(directory, 1).touch()
    return str(directory)


@pytest.fixture
def cluster() -> Iterator[OwnCluster]:
    own = OwnCluster()
    try:
        yield own
    finally:
        own.remove()


@pytest.fixture
def cluster_producer(cluster: OwnCluster) -> Iterator[App]:
    """The resilience app on the own cluster, migrated; closed afterwards."""
    with psycopg.connect(cluster.dsn, autocommit=True) as connection:
        migrate(connection)
    resilience_app.app.configure(Settings(dsn=cluster.dsn))
    try:
        yield resilience_app.app
    finally:
        resilience_app.app.close()


@pytest.fixture
def producer(dsn: str) -> Iterator[App]:
    """The resilience app on this test's database of the shared server; closed afterwards."""
    resilience_app.app.configure(Settings(dsn=dsn))
    try:
        yield resilience_app.app
    finally:
        resilience_app.app.close()


@pytest.fixture
def proxy(dsn: str) -> Iterator[SeverableProxy]:
    target = psycopg.conninfo.conninfo_to_dict(dsn)
    if str(target.get("host", "")).startswith("/") or not target.get("host"):
        pytest.skip("the proxy needs a server reached over TCP; this one listens on a Unix socket")
    severable = SeverableProxy(str(target["host"]), int(target.get("port") or 5432))
    try:
        yield severable
    finally:
        severable.close()


def through(proxy: SeverableProxy, dsn: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)


def test_worker_survives_a_database_restart_and_records_what_finished_meanwhile(
    cluster: OwnCluster, cluster_producer: App, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    worker = worker_processes.start(cluster.dsn, "--concurrency", "10", "--lease-seconds", "30", app=APP)
    gates = tmp_path / "gates"
    gates.mkdir()
    with psycopg.connect(cluster.dsn) as connection:
        before = resilience_app.gated.enqueue_many(connection, [{"gates": str(gates)}] * 10)
    wait_until(lambda: len(executed_ids(worker_processes, "start")) == 10, "ten starts", worker)

    cluster.stop("fast")  # every connection of the worker is cut
    gate_path(gates, 1).touch()  # so the ten jobs finish while the database is down
    wait_until(lambda: len(executed_ids(worker_processes, "end")) == 10, "ten ends", worker)
    # the worker tried to record them, failed, and kept them
    worker.wait_for_output("job outcome(s), database unavailable", timeout=TIMEOUT)
    assert worker.alive(), "the worker must not exit when the database goes away"

    cluster.start()
    with psycopg.connect(cluster.dsn) as connection:
        after = resilience_app.gated.enqueue_many(connection, [{"gates": str(gates)}] * 20)
    wait_for_success(cluster.dsn, [*before, *after], worker)
    # Nothing ran twice: the outcomes kept during the outage were recorded under their
    # leases, so no job was rescued and run again.
    for event in ("start", "end"):
        assert executed_ids(worker_processes, event) == sorted([*before, *after])
    for job_id in before:
        job = stored_job(cluster.dsn, job_id)
        assert (job.attempt, job.errors, job.result) == (1, [], {"pid": worker.pid, "attempt": 1})
    output = stop_cleanly(worker)
    assert "database reachable again: recorded" in output


def test_worker_survives_a_silent_network_cut(
    dsn: str, producer: App, proxy: SeverableProxy, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    worker = worker_processes.start(
        through(proxy, dsn),
        "--concurrency",
        "10",
        "--lease-seconds",
        "30",
        app=APP,
        environment={"PGQUEUE_STATEMENT_TIMEOUT": "1.5"},
    )
    gates = tmp_path / "gates"
    gates.mkdir()
    before = resilience_app.gated.enqueue_many(None, [{"gates": str(gates)}] * 5)
    wait_until(lambda: len(executed_ids(worker_processes, "start")) == 5, "five starts", worker)

    proxy.cut()
    gate_path(gates, 1).touch()  # the jobs finish while the link is dead
    wait_until(lambda: len(executed_ids(worker_processes, "end")) == 5, "five ends", worker)
    # No reset arrives: the call recording them hangs until the statement timeout, and
    # so does the reconnect through the dead link after it. Twice: the outcomes outlived both.
    worker.wait_for_output("job outcome(s), database unavailable", count=2, timeout=TIMEOUT)
    assert worker.alive(), "the worker must not exit when its network goes silent"

    proxy.restore()
    after = resilience_app.gated.enqueue_many(None, [{"gates": str(gates)}] * 10)
    wait_for_success(dsn, [*before, *after], worker)
    for event in ("start", "end"):  # each ran once: none was rescued and run again
        assert executed_ids(worker_processes, event) == sorted([*before, *after])
    for job_id in before:
        job = producer.get_job(job_id)
        assert (job.attempt, job.errors, job.result) == (1, [], {"pid": worker.pid, "attempt": 1})
    stop_cleanly(worker)


def test_a_call_over_a_dead_link_gives_up_after_the_statement_timeout(
    dsn: str, producer: App, proxy: SeverableProxy, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    """PGQUEUE_STATEMENT_TIMEOUT: "seconds a worker waits on one database call before reconnecting"."""
    worker = worker_processes.start(
        through(proxy, dsn), app=APP, environment={"PGQUEUE_STATEMENT_TIMEOUT": "1"}
    )
    wait_until(lambda: len(backends(dsn, "pgqueue-claim")) == 1, "the worker to connect", worker)
    # started, so that the cut meets the claim loop (a cut during the start's schema check
    # is retried the same way, and says "database unreachable")
    worker.wait_for_output(" started: queues ", timeout=TIMEOUT)

    proxy.cut()
    cut_at = time.monotonic()
    # the claim loop polls every 0.2 s, so its next claim goes into the void
    worker.wait_for_output("could not claim jobs", timeout=TIMEOUT)
    waited = time.monotonic() - cut_at
    # A 1 s timeout after a claim at most 0.2 s into the cut: 6 s leaves room for a slow
    # machine. (Cancelling psycopg mid-query took 11 s: 1 + a 5 s cancel request + 5 s.)
    assert waited < 6, f"a claim over a dead link held the worker for {waited:.1f}s:\n{worker.output()}"

    proxy.restore()
    job_id = resilience_app.gated.enqueue(None, gates=open_gates(tmp_path / "gates"))
    wait_for_success(dsn, [job_id], worker)
    stop_cleanly(worker)


def test_listen_comes_back_after_a_database_restart_and_notify_wakes_the_worker(
    cluster: OwnCluster, cluster_producer: App, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    # A poll every ten minutes: within this test, only a NOTIFY can make the worker look
    # for a job (or the listener's own wake-up when it reconnects, ruled out below).
    worker = worker_processes.start(cluster.dsn, app=APP, environment={"PGQUEUE_POLL_INTERVAL": "600"})
    wait_until(lambda: len(listening(cluster.dsn)) == 1, "the worker to LISTEN", worker)
    (first_listener,) = listening(cluster.dsn)

    cluster.stop("fast")
    worker.wait_for_output("LISTEN connection lost", timeout=TIMEOUT)
    cluster.start()
    wait_until(
        lambda: any(pid != first_listener for pid in listening(cluster.dsn)),
        "a new LISTEN session after the restart",
        worker,
    )
    (second_listener,) = listening(cluster.dsn)

    gates = open_gates(tmp_path / "gates")
    # On reconnecting, the listener wakes the claim loop once by itself (notifications
    # sent while it was away are lost), so a job enqueued now might be claimed without
    # any NOTIFY. Run one job through first, then wait until the claim session has been
    # idle for a while: the loop has used up every wake-up and sleeps on its 600 s poll.
    warm_up = resilience_app.gated.enqueue(None, gates=gates)
    wait_for_success(cluster.dsn, [warm_up], worker)
    wait_until(lambda: claim_session_quiet(cluster.dsn, 1.0), "a quiet claim session", worker)

    proof = resilience_app.gated.enqueue(None, gates=gates)
    # within a minute, far below the poll interval: the NOTIFY of the insert woke the worker
    wait_for_success(cluster.dsn, [proof], worker)
    assert stored_job(cluster.dsn, proof).result == {"pid": worker.pid, "attempt": 1}
    # the same LISTEN session throughout (no reconnection, whose wake-up could explain the
    # pickup), and the one from before the restart is gone rather than left beside it
    assert [pid for pid, _, _ in backends(cluster.dsn, "pgqueue-listen")] == [second_listener]
    assert first_listener != second_listener
    output = stop_cleanly(worker)
    assert "LISTEN connection back" in output


def test_outcome_after_an_outage_longer_than_the_lease_is_ignored_and_the_rescued_attempt_wins(
    dsn: str, producer: App, proxy: SeverableProxy, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    # The first worker reaches the database through the proxy; a statement timeout of a
    # second makes it notice the cut quickly. A 3 s lease heartbeaten every second holds
    # comfortably until the cut, even on a loaded machine.
    cut_off = worker_processes.start(
        through(proxy, dsn),
        "--lease-seconds",
        "3",
        app=APP,
        environment={"PGQUEUE_STATEMENT_TIMEOUT": "1"},
    )
    # Two jobs: the rescued attempt of `finished` succeeds before the late outcome arrives,
    # that of `running` is still running when it arrives.
    finished_gates, running_gates = tmp_path / "finished", tmp_path / "running"
    finished_gates.mkdir()
    running_gates.mkdir()
    finished, running = resilience_app.gated.enqueue_many(
        None, [{"gates": str(finished_gates)}, {"gates": str(running_gates)}]
    )
    wait_until(
        lambda: (
            {(line.job_id, line.pid) for line in executions(worker_processes, "start")}
            == {(finished, cut_off.pid), (running, cut_off.pid)}
        ),
        "both jobs to start in the first worker",
        cut_off,
    )

    proxy.cut()
    # Connected directly, the second worker's rescue sweep requeues both jobs once the
    # first worker's leases run out, and runs them again itself.
    rescuer = worker_processes.start(dsn, "--lease-seconds", "3", app=APP)
    wait_until(
        lambda: (
            {(line.job_id, line.attempt, line.pid) for line in executions(worker_processes, "start")}
            >= {(finished, 2, rescuer.pid), (running, 2, rescuer.pid)}
        ),
        "both jobs to be rescued and started again in the second worker",
        cut_off,
        rescuer,
    )
    gate_path(finished_gates, 2).touch()
    wait_for_success(dsn, [finished], cut_off, rescuer)
    rescued = producer.get_job(finished)

    # Still cut off, the first worker's attempts now finish: it cannot record them.
    gate_path(finished_gates, 1).touch()
    gate_path(running_gates, 1).touch()
    wait_until(
        lambda: (
            {(line.job_id, line.attempt) for line in executions(worker_processes, "end")}
            >= {(finished, 1), (running, 1)}
        ),
        "the first attempts to end",
        cut_off,
        rescuer,
    )
    cut_off.wait_for_output("job outcome(s), database unavailable", timeout=TIMEOUT)

    proxy.restore()

    def late_outcomes_delivered() -> bool:
        """The worker said the database refused both, or one of the jobs changed."""
        refused = all(
            f"of job {job_id} (attempt 1) was not recorded: its lease was lost" in cut_off.output()
            for job_id in (finished, running)
        )
        changed = producer.get_job(finished) != rescued or producer.get_job(running).state != "running"
        return refused or changed

    wait_until(late_outcomes_delivered, "the late outcomes to reach the database", cut_off, rescuer)
    # the finished job is untouched (state, result, finished_at, errors)...
    assert producer.get_job(finished) == rescued
    # ...and the running one still runs its second attempt, in the second worker
    job = producer.get_job(running)
    assert (job.state, job.attempt, job.result) == ("running", 2, None)
    assert job.worker is not None and f":{rescuer.pid}:" in job.worker

    gate_path(running_gates, 2).touch()
    wait_for_success(dsn, [running], cut_off, rescuer)
    for job_id in (finished, running):
        job = producer.get_job(job_id)
        assert (job.state, job.attempt) == ("succeeded", 2)
        assert job.result == {"pid": rescuer.pid, "attempt": 2}  # the second attempt's
        assert len(job.errors) == 1, job.errors  # one failed attempt: the first, whose lease ran out
        (lost,) = job.errors
        assert (lost["kind"], lost["attempt"]) == ("lease_expired", 1)
        assert f":{cut_off.pid}:" in lost["worker"]
        # the side effects: each attempt ran once, in the worker that claimed it
        lines = executions(worker_processes, job_id=job_id)
        runs = sorted((line.attempt, line.event, line.pid) for line in lines)
        assert runs == [
            (1, "end", cut_off.pid),
            (1, "start", cut_off.pid),
            (2, "end", rescuer.pid),
            (2, "start", rescuer.pid),
        ]

    # The first worker was paused, not ended: with the rescuer gone, it runs new jobs.
    stop_cleanly(rescuer)
    afterwards = resilience_app.gated.enqueue(None, gates=open_gates(tmp_path / "afterwards"))
    wait_for_success(dsn, [afterwards], cut_off)
    assert producer.get_job(afterwards).result == {"pid": cut_off.pid, "attempt": 1}
    stop_cleanly(cut_off)


def test_an_outcome_whose_reply_was_lost_is_not_reported_as_a_lost_lease(
    dsn: str, producer: App, proxy: SeverableProxy, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    worker = worker_processes.start(
        through(proxy, dsn), app=APP, environment={"PGQUEUE_STATEMENT_TIMEOUT": "1"}
    )
    # one job through first: the worker's connection for outcomes is opened by its first
    # flush, and a handshake whose answers are lost would never send the statement
    warm_up = resilience_app.gated.enqueue(None, gates=open_gates(tmp_path / "open"))
    wait_for_success(dsn, [warm_up], worker)
    gates = tmp_path / "gates"
    gates.mkdir()  # closed: the test lets the attempt end
    job_id = resilience_app.gated.enqueue(None, gates=str(gates))
    wait_until(lambda: job_id in executed_ids(worker_processes, "start"), "the job to start", worker)

    proxy.cut_replies()
    gate_path(gates, 1).touch()
    # the flush reaches the server and commits; only its answer is lost
    wait_until(lambda: job_states(dsn, [job_id]) == {job_id: "succeeded"}, "the outcome to commit", worker)
    worker.wait_for_output("could not record 1 job outcome(s)", timeout=TIMEOUT)
    proxy.restore()
    worker.wait_for_output("database reachable again: recorded", timeout=TIMEOUT)
    job = stored_job(dsn, job_id)
    assert (job.attempt, job.result, job.errors) == (1, {"pid": worker.pid, "attempt": 1}, [])
    assert "lease was lost" not in worker.output(), worker.output()
    stop_cleanly(worker)
