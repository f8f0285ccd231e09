"""The metrics stack: docker-compose.yml, deploy/prometheus.yml, Grafana's provisioning and
the pgqueue dashboard (deploy/grafana/).

The quick tests read the files: the compose services, ports and mounts agree with the
Prometheus targets and the files in the repository; every dashboard panel queries the
dashboard's data source variable. The slow test runs the real thing: a `pgqueue worker`
with --metrics-port and a `pgqueue metrics` exporter on the test's database, scraped
every second by a real Prometheus (Debian's `prometheus` package, which also ships
`promtool`) loaded with deploy/prometheus.yml's jobs, and every panel's PromQL evaluated
through Prometheus's HTTP API against known jobs.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgqueue import App
from pgqueue.testing import wait_for, wait_for_states
from tests import sample_app
from tests.conftest import REPOSITORY, pgqueue_command, subprocess_environment
from tests.processes import WorkerProcesses

COMPOSE = REPOSITORY / "docker-compose.yml"
PROMETHEUS_CONFIG = REPOSITORY / "deploy" / "prometheus.yml"
DASHBOARD = REPOSITORY / "deploy" / "grafana" / "pgqueue-dashboard.json"
PROVISIONING = REPOSITORY / "deploy" / "grafana" / "provisioning"

DATA_SOURCE = {"type": "prometheus", "uid": "${datasource}"}
EXPECTED_PANELS = {
    "Throughput by outcome",
    "Error rate",
    "Run time p50 / p95 / p99 by task",
    "Queue wait p95 by queue",
    "Queue depth by queue and state",
    "Oldest ready job age by queue",
    "Dead-letter growth (1h)",
    "Live workers",
    "Saturation",
    "Claim and flush batch sizes",
    "Reconnects by connection",
}
# Grafana's own variables the panels may use, besides the dashboard's template variables.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
# What the slow test puts in their place: Grafana's "All" for a queue, and a rate window
# longer than the test's Prometheus lives, so every rate covers all its scrapes.
SUBSTITUTES = {"__rate_interval": "10m", "__interval": "10m", "__range": "10m", "queue": ".*"}
# Counters without a series until their first event, which the slow test never causes.
SILENT_UNTIL_THEIR_FIRST_EVENT = {"pgqueue_worker_reconnects_total", "pgqueue_jobs_rescued_total"}
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
METRIC = re.compile(r"\bpgqueue_\w+")

MISSING_PROMETHEUS = (
    "!!! NOT TESTED: the dashboard against a real Prometheus. This test needs Debian's "
    "`prometheus` package (the `prometheus` and `promtool` binaries on PATH): "
    "apt-get install prometheus !!!"
)


# -- reading YAML without PyYAML ----------------------------------------------------

# `key: value` or `key:`; a key holds no colon, a value starts after whitespace
YAML_KEY = re.compile(r"(?P<key>\"[^\"]*\"|[^\s\"'#:\-][^:]*?):(?:\s+(?P<value>.*))?$")


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels_by_title() -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in load_dashboard()["panels"]}


def option(command: list[str], name: str) -> str:
    """The value after `name` in a command line given as a list."""
    assert name in command, command
    return command[command.index(name) + 1]


def scrape_targets(config: dict[str, Any]) -> dict[str, list[str]]:
    """Targets of each scrape job of a Prometheus configuration."""
    return {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in config["scrape_configs"]
    }


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> path in the repository, of a service's `./host:container[:ro]` volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = REPOSITORY / source
    return mounts


def test_compose_serves_the_ports_prometheus_scrapes_and_mounts_the_repository_files() -> None:
    """docker-compose.yml runs the worker with --metrics-port 9400 and the exporter on port 9401,
    exactly the targets of deploy/prometheus.yml, on the worker's database; Prometheus and
    Grafana mount files that exist in the repository: the scrape configuration, Grafana's
    provisioning folder and the dashboard in the folder its provider loads."""
    services = read_yaml(COMPOSE)["services"]
    assert {"postgres", "migrate", "worker", "exporter", "prometheus", "grafana"} <= set(services)
    worker, exporter = services["worker"], services["exporter"]
    assert worker["command"][:2] == ["worker", "pgqueue.examples:app"]
    assert option(worker["command"], "--metrics-port") == "9400"
    assert exporter["command"][0] == "metrics"
    assert option(exporter["command"], "--port") == "9401"
    assert exporter["environment"]["PGQUEUE_DSN"] == worker["environment"]["PGQUEUE_DSN"]
    assert exporter["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert scrape_targets(read_yaml(PROMETHEUS_CONFIG)) == {
        "pgqueue-worker": ["worker:9400"],
        "pgqueue-exporter": ["exporter:9401"],
    }

    assert services["prometheus"]["image"].split(":")[0] == "prom/prometheus"
    assert bind_mounts(services["prometheus"]) == {"/etc/prometheus/prometheus.yml": PROMETHEUS_CONFIG}
    grafana = services["grafana"]
    assert grafana["image"].split(":")[0] == "grafana/grafana"
    assert "127.0.0.1:3000:3000" in grafana["ports"]  # published on this host only
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"].resolve() == PROVISIONING
    dashboards = [target for target, source in mounts.items() if source.resolve() == DASHBOARD]
    assert dashboards == ["/var/lib/grafana/dashboards/pgqueue-dashboard.json"]
    for source in [*mounts.values(), *bind_mounts(services["prometheus"]).values()]:
        assert source.exists(), f"docker-compose.yml mounts {source}, which is not in the repository"


def test_grafana_provisions_compose_prometheus_and_the_mounted_dashboard_folder() -> None:
    """The data source is the compose `prometheus` service, default so the dashboard's data
    source variable picks it; the dashboard provider loads the folder the dashboard is
    mounted in."""
    datasources = read_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert [(source["type"], source["url"], source["isDefault"]) for source in datasources] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    providers = read_yaml(PROVISIONING / "dashboards" / "pgqueue.yml")["providers"]
    assert [(provider["type"], provider["options"]["path"]) for provider in providers] == [
        ("file", "/var/lib/grafana/dashboards")
    ]


def test_every_dashboard_panel_queries_the_data_source_variable() -> None:
    """The dashboard is valid JSON with uid `pgqueue`, a Prometheus data source variable, unique
    panel ids, and the expected panels (by title); each panel has a title, a place on the
    grid, the data source variable, and targets each with a refId of its own and an
    expression that uses only defined variables."""
    dashboard = load_dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("pgqueue", "pgqueue")
    assert dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["queue"]["datasource"] == DATA_SOURCE
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), titles
    assert set(titles) >= EXPECTED_PANELS, EXPECTED_PANELS - set(titles)
    for panel in panels:
        assert panel["title"].strip()
        assert set(panel["gridPos"]) >= {"x", "y", "w", "h"}, panel["title"]
        assert panel["datasource"] == DATA_SOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", DATA_SOURCE) == DATA_SOURCE, panel["title"]
            used = {braced or plain for braced, plain in VARIABLE.findall(target["expr"])}
            assert used <= set(variables) | GRAFANA_VARIABLES, (panel["title"], used)


# -- the real thing: a worker, the exporter and Prometheus --------------------------


class Daemon:
    """A long-running subprocess in its own process group, its output in a file."""

    def __init__(self, name: str, command: list[str], directory: Path) -> None:
        self.output_path = directory / f"{name}.out"
        with self.output_path.open("wb") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=directory,
                env=subprocess_environment(),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[str, list[str]], Daemon]]:
    """Starts daemons (the exporter, Prometheus) in the test's directory; stops them at its end."""
    started: list[Daemon] = []

    def start(name: str, command: list[str]) -> Daemon:
        daemon = Daemon(name, command, tmp_path)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in reversed(started):
            daemon.stop()


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(MISSING_PROMETHEUS)
    return path


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, distinct from each other."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [each.getsockname()[1] for each in sockets]
    finally:
        for each in sockets:
            each.close()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def answers(url: str) -> bool:
    try:
        fetch(url)
    except OSError:  # refused, reset, or an HTTP error status
        return False
    return True


def wait_until_serving(url: str, process: subprocess.Popen[bytes], output: Callable[[], str]) -> None:
    wait_for(lambda: answers(url) or process.poll() is not None, timeout=60, interval=0.1, what=url)
    assert process.poll() is None, f"exited ({process.returncode}) before serving {url}:\n{output()}"


class Prometheus:
    """The HTTP API of a Prometheus server that scrapes the jobs `jobs`."""

    def __init__(self, port: int, jobs: set[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.jobs = jobs

    def query(self, expression: str) -> dict[str, Any]:
        """/api/v1/query's answer, an error included (Prometheus answers one with HTTP 400 or 422)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        try:
            body = fetch(url)
        except urllib.error.HTTPError as error:
            body = error.read().decode()
        answer: dict[str, Any] = json.loads(body)
        return answer

    def series(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of each series of an instant vector."""
        answer = self.query(expression)
        assert answer["status"] == "success", (expression, answer)
        assert answer["data"]["resultType"] == "vector", (expression, answer)
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]

    def value(self, expression: str) -> float:
        """The value of an expression that yields one series."""
        results = self.series(expression)
        assert len(results) == 1, (expression, results)
        return results[0][1]

    def wait_for_scrapes_after(self, moment: float) -> None:
        """Wait until Prometheus has scraped every job's target since `moment` (a Unix time)."""

        def scraped() -> bool:
            latest = {labels["job"]: value for labels, value in self.series("timestamp(up)")}
            return set(latest) == self.jobs and min(latest.values()) > moment

        wait_for(scraped, timeout=30, interval=0.1, what=f"a scrape of every target after {moment}")


def test_promtool_accepts_the_deploy_configuration() -> None:
    """deploy/prometheus.yml is a valid Prometheus configuration, by Prometheus's own checker."""
    checked = subprocess.run(
        [binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def local_configuration(worker_port: int, exporter_port: int) -> str:
    """deploy/prometheus.yml with its targets on this machine's ports and 1 s scrapes, as JSON
    (which is YAML to Prometheus)."""
    config = read_yaml(PROMETHEUS_CONFIG)
    config["global"] = {**config["global"], "scrape_interval": "1s", "evaluation_interval": "1s"}
    local = {"worker:9400": f"127.0.0.1:{worker_port}", "exporter:9401": f"127.0.0.1:{exporter_port}"}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [local[target] for target in static["targets"]]
    return json.dumps(config)


def exposed_names(exposition: str) -> set[str]:
    """Names of the samples a /metrics page may hold, from its `# TYPE` lines."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def finished_attempts(exposition: str) -> float:
    """The sum of a worker's pgqueue_jobs_finished_total samples."""
    pattern = re.compile(r"^pgqueue_jobs_finished_total\{[^}]*\} (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(exposition))


def check_metrics(promtool: str, exposition: str) -> None:
    """promtool's lint of a /metrics page: exit 0, nothing to report."""
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def substitute(expression: str) -> str:
    """A panel's expression with Grafana's variables replaced as Grafana would."""
    return VARIABLE.sub(lambda match: SUBSTITUTES[match[1] or match[2]], expression)


def panel_expressions() -> list[tuple[str, str]]:
    """(panel title, expression with its variables substituted) of every target."""
    return [
        (panel["title"], substitute(target["expr"]))
        for panel in load_dashboard()["panels"]
        for target in panel["targets"]
    ]


CPU_JOBS = 20  # per wave, besides one cpu_retry (retried, then succeeded) and one dead job
SCHEDULED = 4  # due in an hour: never run during the test
WAVES = 2


def run_wave(number: int, dsn: str, worker_url: str, prometheus: Prometheus, directory: Path) -> None:
    """Enqueue a wave of jobs, wait for their end, for the worker to count them, and for
    Prometheus to scrape the final figures.

    Two waves, because a series that first appears with a value shows no rate: the
    second wave raises counters whose first figures Prometheus holds from the first.
    """
    ids = sample_app.cpu.enqueue_many(None, [{"n": 1000 * number + n} for n in range(CPU_JOBS)])
    ids.append(sample_app.cpu_retry.enqueue(None, marker=str(directory / f"retried-{number}")))
    dead = sample_app.cpu_unpicklable.enqueue(None, picky=True)
    states = wait_for_states(dsn, [*ids, dead], timeout=120)
    assert {states[job_id] for job_id in ids} == {"succeeded"}
    assert states[dead] == "dead"
    # per wave: each cpu job succeeded, the cpu_retry job was retried and then succeeded, one died
    attempts = number * (CPU_JOBS + 3)
    wait_for(
        lambda: finished_attempts(fetch(worker_url)) == attempts,
        timeout=30,
        interval=0.05,
        what=f"the worker to count {attempts} finished attempts",
    )
    prometheus.wait_for_scrapes_after(time.time())


@pytest.mark.slow
def test_every_panel_evaluates_on_prometheus_scraping_a_real_worker_and_exporter(
    dsn: str,
    sample: App,
    worker_processes: WorkerProcesses,
    daemons: Callable[[str, list[str]], Daemon],
    tmp_path: Path,
) -> None:
    """Every expression of the dashboard evaluates without error on a real Prometheus, and
    every one shows data, but for counters of events that did not happen (reconnects, lease
    rescues). The figures are the jobs run: succeeded cpu jobs, the scheduled and dead
    depth, run time for task cpu, a non-zero error rate, one live worker. Every metric name
    a panel uses is one a /metrics page declares, and promtool finds nothing to report on
    either page."""
    prometheus_binary, promtool = binary("prometheus"), binary("promtool")
    worker_port, exporter_port, prometheus_port = free_ports(3)
    worker_url = f"http://127.0.0.1:{worker_port}/metrics"
    exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"

    worker = worker_processes.start(
        dsn, "--metrics-port", str(worker_port), environment={"PGQUEUE_METRICS_HOST": "127.0.0.1"}
    )
    exporter = daemons(
        "exporter",
        pgqueue_command("--dsn", dsn, "metrics", "--port", str(exporter_port), "--host", "127.0.0.1"),
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(local_configuration(worker_port, exporter_port))
    server = daemons(
        "prometheus",
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
    )
    prometheus = Prometheus(prometheus_port, {"pgqueue-worker", "pgqueue-exporter"})
    wait_until_serving(worker_url, worker.process, worker.output)
    wait_until_serving(exporter_url, exporter.process, exporter.output)
    wait_until_serving(f"{prometheus.url}/-/ready", server.process, server.output)
    prometheus.wait_for_scrapes_after(time.time())
    assert {labels["job"]: value for labels, value in prometheus.series("up")} == {
        "pgqueue-worker": 1.0,
        "pgqueue-exporter": 1.0,
    }

    sample_app.cpu.options(delay=3600).enqueue_many(None, [{"n": n} for n in range(SCHEDULED)])
    for number in range(1, WAVES + 1):
        run_wave(number, dsn, worker_url, prometheus, tmp_path)

    assert_every_panel_shows_data(prometheus)
    assert prometheus.value('sum(pgqueue_jobs_finished_total{outcome="succeeded",task="cpu"})') == (
        WAVES * CPU_JOBS
    )
    assert_panel_figures(prometheus)
    worker_page, exporter_page = fetch(worker_url), fetch(exporter_url)
    named = {name for _, expression in panel_expressions() for name in METRIC.findall(expression)}
    assert named <= exposed_names(worker_page) | exposed_names(exporter_page)
    check_metrics(promtool, worker_page)
    check_metrics(promtool, exporter_page)
    assert worker.alive(), worker.output()


def assert_every_panel_shows_data(prometheus: Prometheus) -> None:
    """Each expression evaluates without error or warning, and yields series unless all it
    reads are counters silent until their first event."""
    failures = []
    for title, expression in panel_expressions():
        answer = prometheus.query(expression)
        if answer["status"] != "success" or answer.get("warnings"):
            failures.append(f"{title}: {expression}: {answer}")
        elif not answer["data"]["result"] and not (
            set(METRIC.findall(expression)) <= SILENT_UNTIL_THEIR_FIRST_EVENT
        ):
            failures.append(f"{title}: {expression}: no data")
    assert not failures, "\n".join(failures)


def assert_panel_figures(prometheus: Prometheus) -> None:
    """The panels' figures after the waves: what the jobs did, read through the panels' own
    expressions."""
    panels = {
        title: [substitute(target["expr"]) for target in panel["targets"]]
        for title, panel in panels_by_title().items()
    }

    (depth,) = panels["Queue depth by queue and state"]
    by_state: dict[str, float] = {}
    for labels, value in prometheus.series(depth):  # a series per queue and state: the sample app has several
        by_state[labels["state"]] = by_state.get(labels["state"], 0) + value
    assert by_state == {"ready": 0, "scheduled": SCHEDULED, "running": 0, "dead": WAVES}

    for expression in panels["Run time p50 / p95 / p99 by task"]:
        run_time = {labels["task"]: value for labels, value in prometheus.series(expression)}
        assert math.isfinite(run_time["cpu"]) and run_time["cpu"] > 0, (expression, run_time)
    assert prometheus.value('sum(pgqueue_job_run_seconds_count{task="cpu"})') == WAVES * CPU_JOBS

    (throughput,) = panels["Throughput by outcome"]
    outcomes = {labels["outcome"]: value for labels, value in prometheus.series(throughput)}
    assert set(outcomes) == {"succeeded", "retried", "dead"}
    assert all(value > 0 for value in outcomes.values()), outcomes

    (error_rate,) = panels["Error rate"]
    assert 0 < prometheus.value(error_rate) < 1
    (live,) = panels["Live workers"]
    assert prometheus.value(live) == 1
    (saturation,) = panels["Saturation"]
    assert prometheus.value(saturation) == 0  # every job has finished
