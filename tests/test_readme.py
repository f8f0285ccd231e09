"""The README runs: every fenced snippet of README.md is run here as written, or excused with a reason.

README.md is split into its fenced blocks. A ```python block whose first line names a
file (`# myproject/jobs.py`, `# conftest.py`) is written to that file in the test's
temporary directory; any other ```python block is a script, run there by a fresh
interpreter. A ```sql block runs through psycopg, every statement of it. A ```sh block
is read command by command: the `pgqueue …` ones run as subprocesses (`python -m
pgqueue`, this checkout's code), the others are excused in NOT_RUN_COMMANDS with the
reason. Every run gets the test's own database as PGQUEUE_DSN, the way a user sets it.

Shell notation the README uses and how it is read here:
- `a && b`, and `a / b` on one line, are two commands.
- `[--flag]` is optional: the command runs without it in place, then with it once every
  plain command of the block ran (`pgqueue dead --retry-all` in place would redrive job
  123 before `pgqueue retry 123` does).
- `pgqueue worker …` gets `--burst`: it exits once its queues are drained instead of
  serving until a signal.

Each block is either run by a test below (RUN_HERE names which) or preceded in the
README by `<!-- not run: reason -->`; test_every_snippet_is_run_or_excused fails on any
other, so the README cannot grow an example that nobody runs. Blocks without a language
(the Layout listing) are text, not code. That check reads the README only, so it stays in
the quick loop; the tests that run snippets start interpreters and are marked slow.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgqueue import App, Fail, InvalidJobError, Priority
from pgqueue.testing import running_worker, wait_for_states
from tests.conftest import REPOSITORY, pgqueue_command, subprocess_environment
from tests.pgbouncer import PgBouncer
from tests.processes import WorkerProcesses

README = REPOSITORY / "README.md"
LANGUAGES = {"python", "sql", "sh", "ini", ""}

# (section heading, language, position among that section's blocks of that language)
SnippetKey = tuple[str, str, int]

JOBS_MODULE: SnippetKey = ("Using it", "python", 0)
ENQUEUE_EXAMPLE: SnippetKey = ("Using it", "python", 1)
FROM_SQL: SnippetKey = ("Using it", "sql", 0)
QUICK_START: SnippetKey = ("Quick start", "sh", 0)
COMMAND_LINE: SnippetKey = ("Command line", "sh", 0)
EAGER_TEST: SnippetKey = ("Testing your own tasks", "python", 0)
TESTING_CONFTEST: SnippetKey = ("Testing your own tasks", "python", 1)
TESTING_TEST: SnippetKey = ("Testing your own tasks", "python", 2)
FOLLOWING: str = "Following a job: handles, progress, results, cancelling"
REPORTS_MODULE: SnippetKey = (FOLLOWING, "python", 0)
HANDLES_EXAMPLE: SnippetKey = (FOLLOWING, "python", 1)
PERIODIC_MODULE: SnippetKey = ("Periodic jobs", "python", 0)
SCHEDULES_ADD: SnippetKey = ("Periodic jobs", "python", 1)
CRON_COMMANDS: SnippetKey = ("Periodic jobs", "sh", 0)
EVENTS_EXAMPLE: SnippetKey = ("Lifecycle events", "python", 0)
HOOKS_EXAMPLE: SnippetKey = ("Hooks", "python", 0)
HISTORY_SQL: SnippetKey = ("Watching it", "sql", 0)
ROLE_GRANTS: SnippetKey = ("Deploying: PgBouncer, roles, connections", "sql", 0)
POOLER_SETTINGS: SnippetKey = ("Deploying: PgBouncer, roles, connections", "ini", 0)

# The blocks the tests below run, and which test does.
RUN_HERE: dict[SnippetKey, str] = {
    JOBS_MODULE: "written to myproject/jobs.py by the tests of the other snippets, which import it",
    ENQUEUE_EXAMPLE: "test_using_it_enqueues_in_your_own_transaction",
    FROM_SQL: "test_from_sql_enqueue_redrive_cancel_and_inspect",
    QUICK_START: "test_quick_start_demo",
    COMMAND_LINE: "test_command_line_line_by_line",
    EAGER_TEST: "test_the_testing_helpers_example_passes_as_a_users_suite",
    TESTING_CONFTEST: "test_the_testing_helpers_example_passes_as_a_users_suite",
    REPORTS_MODULE: "written to myproject/reports.py by the tests of the handles and events examples",
    HANDLES_EXAMPLE: "test_a_handle_waits_reads_progress_and_cancels",
    PERIODIC_MODULE: "test_periodic_jobs_declared_added_and_listed",
    SCHEDULES_ADD: "test_periodic_jobs_declared_added_and_listed",
    CRON_COMMANDS: "test_periodic_jobs_declared_added_and_listed",
    EVENTS_EXAMPLE: "test_the_events_example_sees_its_job_end",
    TESTING_TEST: "test_the_testing_helpers_example_passes_as_a_users_suite",
    HOOKS_EXAMPLE: "test_the_hooks_example_counts_what_a_worker_finished",
    HISTORY_SQL: "test_the_history_questions_answer_from_a_real_run (plans: test_observability.py)",
    ROLE_GRANTS: "test_the_role_grants_give_each_service_its_rights",
    POOLER_SETTINGS: "test_the_pooler_settings_run_a_worker_through_pgbouncer",
}

# `pgqueue` subcommands each run block's test knows how to run and check.
RUNNABLE_SUBCOMMANDS: dict[SnippetKey, frozenset[str]] = {
    QUICK_START: frozenset({"demo"}),
    COMMAND_LINE: frozenset(
        {
            "migrate",
            "worker",
            "enqueue",
            "queue",
            "status",
            "health",
            "retention",
            "prune",
            "job",
            "dead",
            "retry",
            "cancel",
            "cron",
            "events",
            "roles",
        }
    ),
    CRON_COMMANDS: frozenset({"cron"}),
}

# Shell commands of the README that are not run here, and why (keyed by shlex.join).
NOT_RUN_COMMANDS: dict[str, str] = {
    "python3 -m venv .venv": "creates a virtualenv; these tests already run in one",
    ". .venv/bin/activate": "activates that virtualenv",
    "pip install -e '.[embedded,test]'": (
        "installs from the network; CI's fresh virtualenv and its quick-start step run it"
    ),
    "python -m pytest": "the whole suite, this module included: minutes long, and it would run itself",
}

FENCE = re.compile(r"```(\S*)\s*")
HEADING = re.compile(r"#{1,6} +(.+?)\s*")
NOT_RUN_MARKER = re.compile(r"<!--\s*not run:(.*?)-->")
FILE_HEADER = re.compile(r"# ([\w./-]+\.py)")
OPTIONAL_WORD = re.compile(r"\[(-.+)\]")


@dataclass(frozen=True)
class Snippet:
    """One fenced block of README.md."""

    section: str  # the heading above it
    language: str  # the fence's info string: "python", "sql", "sh", or "" for text
    position: int  # among the section's blocks of the same language, from 0
    line: int  # README line of the opening fence
    code: str
    not_run: str | None  # the reason of a `<!-- not run: reason -->` right above it

    @property
    def key(self) -> SnippetKey:
        return (self.section, self.language, self.position)

    def where(self) -> str:
        return f"README.md line {self.line} ({self.section!r}, {self.language or 'text'} #{self.position})"


def parse_snippets(text: str) -> list[Snippet]:
    """The fenced blocks of a Markdown text, with the section each one is in."""
    lines = text.splitlines()
    snippets: list[Snippet] = []
    positions: dict[tuple[str, str], int] = {}
    section = ""
    index = 0
    while index < len(lines):
        fence = FENCE.fullmatch(lines[index])
        if fence is None:
            heading = HEADING.fullmatch(lines[index])
            if heading is not None:
                section = heading.group(1)
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"README.md line {index + 1}: a fenced block that never closes"
        above = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        marker = NOT_RUN_MARKER.fullmatch(above)
        language = fence.group(1)
        position = positions.get((section, language), 0)
        positions[section, language] = position + 1
        snippets.append(
            Snippet(
                section=section,
                language=language,
                position=position,
                line=index + 1,
                code="\n".join(lines[index + 1 : end]) + "\n",
                not_run=marker.group(1).strip() if marker else None,
            )
        )
        index = end + 1
    return snippets


def snippet(key: SnippetKey) -> Snippet:
    for found in parse_snippets(README.read_text()):
        if found.key == key:
            assert found.not_run is None, f"{found.where()} is marked not run, yet {RUN_HERE[key]} runs it"
            return found
    raise AssertionError(f"README.md has no {key[1]} block #{key[2]} in section {key[0]!r} any more")


def write_file_snippet(key: SnippetKey, directory: Path) -> Path:
    """Write a block whose first line names its file (`# myproject/jobs.py`) to that file."""
    block = snippet(key)
    header = FILE_HEADER.fullmatch(block.code.splitlines()[0])
    assert header, f"{block.where()} does not start with a `# path/to/file.py` line"
    path = directory / header.group(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.code)
    return path


def shell_commands(block: Snippet) -> list[list[str]]:
    """The commands of a ```sh block, as words (comments dropped, `&&` and ` / ` split)."""
    commands: list[list[str]] = []
    for line in block.code.splitlines():
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word in ("&&", "/"):
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(word)
    return commands


def plain_form(words: list[str]) -> list[str]:
    """The command without its optional `[--flag]` words."""
    return [word for word in words if not OPTIONAL_WORD.fullmatch(word)]


def full_form(words: list[str]) -> list[str]:
    """The command with its optional words, brackets removed."""
    return [(match.group(1) if (match := OPTIONAL_WORD.fullmatch(word)) else word) for word in words]


def command_forms(block: Snippet) -> list[list[str]]:
    """Every command to run, in order: each in its plain form, then those with optional words in full."""
    commands = shell_commands(block)
    return [plain_form(words) for words in commands] + [
        full_form(words) for words in commands if plain_form(words) != words
    ]


def run(
    arguments: list[str], directory: Path, environment: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        arguments, cwd=directory, env=environment, capture_output=True, text=True, timeout=60
    )


def describe(what: str, completed: subprocess.CompletedProcess[str]) -> str:
    return f"{what} exited {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"


def every_job_state(dsn: str) -> dict[int, str]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute("select id, state::text from pgqueue.jobs").fetchall()
    return {int(job_id): str(state) for job_id, state in rows}


def dead_letter_jobs_122_and_123(dsn: str, new_app: Callable[..., App]) -> list[int]:
    """Jobs 122 and 123 of `emails.send_welcome`, dead-lettered by a worker whose handler raises
    Fail("no user 5") and Fail("no user 6"): the README's examples act on job ids 123 and 124."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("alter sequence pgqueue.jobs_id_seq restart with 122")
    app = new_app(poll_interval=0.1)

    @app.task(name="emails.send_welcome", queue="emails")
    def send_welcome(user_id: int) -> None:
        raise Fail(f"no user {user_id}")

    dead = [send_welcome.enqueue(None, user_id=user_id) for user_id in (5, 6)]
    with running_worker(app):
        assert wait_for_states(dsn, dead) == {122: "dead", 123: "dead"}
    return dead


# -- the inventory ---------------------------------------------------------------------


def test_every_snippet_is_run_or_excused() -> None:
    """A block the README grows is run by a test here, or marked `<!-- not run: reason -->`."""
    snippets = parse_snippets(README.read_text())
    problems: list[str] = []
    for block in snippets:
        if block.language not in LANGUAGES:
            problems.append(f"{block.where()}: language {block.language!r} is not one this test reads")
        elif block.language == "":
            continue
        elif block.not_run is not None:
            if not block.not_run:
                problems.append(f"{block.where()}: marked not run without a reason")
            if block.key in RUN_HERE:
                problems.append(f"{block.where()}: marked not run, yet listed in RUN_HERE")
        elif block.language == "sh":
            for words in command_forms(block):
                command = shlex.join(words)
                if shlex.join(plain_form(words)) in NOT_RUN_COMMANDS:
                    continue
                runnable = RUNNABLE_SUBCOMMANDS.get(block.key, frozenset())
                if words[0] != "pgqueue" or len(words) < 2 or words[1] not in runnable:
                    problems.append(
                        f"{block.where()}: `{command}` is neither run by a test here nor in NOT_RUN_COMMANDS"
                    )
        elif block.key not in RUN_HERE:
            problems.append(
                f"{block.where()}: no test runs it; run it in tests/test_readme.py "
                "or mark it `<!-- not run: reason -->` in the README"
            )
    keys = {block.key for block in snippets}
    problems += [
        f"RUN_HERE lists {key}, which README.md does not have" for key in RUN_HERE if key not in keys
    ]
    assert not problems, "\n".join(problems)


def test_the_parser_reads_sections_markers_and_shell_notation() -> None:
    text = (
        "## One\n\n```python\nprint(1)\n```\n\n<!-- not run: needs a GPU -->\n```python\n"
        "# a comment, not a heading\n```\n\n## Two\n\n```sh\n"
        "pgqueue status [--json]   # counts\npgqueue retry 1 / pgqueue cancel 2\n"
        "pip install -e '.[x]' && pgqueue demo\n```\n"
    )
    first, second, shell = parse_snippets(text)
    assert (first.key, first.code, first.not_run, first.line) == (("One", "python", 0), "print(1)\n", None, 3)
    assert (second.key, second.not_run) == (("One", "python", 1), "needs a GPU")
    assert shell.key == ("Two", "sh", 0)
    assert command_forms(shell) == [
        ["pgqueue", "status"],
        ["pgqueue", "retry", "1"],
        ["pgqueue", "cancel", "2"],
        ["pip", "install", "-e", ".[x]"],
        ["pgqueue", "demo"],
        ["pgqueue", "status", "--json"],
    ]


# -- Quick start -----------------------------------------------------------------------


@pytest.mark.slow
def test_quick_start_demo(empty_dsn: str, tmp_path: Path) -> None:
    """`pgqueue demo` on a database without the schema: migrate, enqueue, a burst worker, results."""
    demos = 0
    for words in command_forms(snippet(QUICK_START)):
        if shlex.join(words) in NOT_RUN_COMMANDS:
            continue
        assert words == ["pgqueue", "demo"], f"no check for `{shlex.join(words)}`"
        completed = run(pgqueue_command(*words[1:]), tmp_path, subprocess_environment(PGQUEUE_DSN=empty_dsn))
        assert completed.returncode == 0, describe("pgqueue demo", completed)
        assert re.search(r"migrations applied: \[1(, \d+)*\]", completed.stdout), completed.stdout
        enqueued = re.search(r"enqueued (\d+) jobs in one transaction", completed.stdout)
        assert enqueued, completed.stdout
        states = every_job_state(empty_dsn)
        assert len(states) == int(enqueued.group(1))
        # the demo's jobs all end: most succeed, one is dead-lettered on purpose
        assert set(states.values()) == {"succeeded", "dead"}, states
        demos += 1
    assert demos == 1


# -- Using it --------------------------------------------------------------------------


@pytest.mark.slow
def test_using_it_enqueues_in_your_own_transaction(dsn: str, tmp_path: Path) -> None:
    write_file_snippet(JOBS_MODULE, tmp_path)
    block = snippet(ENQUEUE_EXAMPLE)
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    with psycopg.connect(dsn, autocommit=True) as connection:
        # the example writes to a table of the user's own, in the same transaction
        connection.execute("create table users (id bigint primary key)")

    completed = run([sys.executable, str(script)], tmp_path, subprocess_environment(PGQUEUE_DSN=dsn))
    assert completed.returncode == 0, describe(f"the script at README.md line {block.line}", completed)
    assert completed.stderr == ""

    with psycopg.connect(dsn, autocommit=True) as connection:
        assert connection.execute("select id from users").fetchall() == [(42,)]
        jobs = connection.execute(
            "select task, queue, max_attempts, timeout_seconds, count(*)"
            " from pgqueue.jobs where state = 'queued' group by 1, 2, 3, 4"
        ).fetchall()
        # 42 and 1 in your transaction, 10,000 by COPY, 7 through the app's pool, 3 async
        assert jobs == [("emails.send_welcome", "emails", 5, 30.0, 10_004)]
        repeated = connection.execute(
            "select (args ->> 'user_id')::int, count(*) from pgqueue.jobs group by 1 having count(*) > 1"
        ).fetchall()
        assert sorted(repeated) == [(1, 2), (3, 2), (7, 2), (42, 2)]  # each once more than the COPY
        delayed = connection.execute(
            "select args, priority, extract(epoch from run_at - created_at) from pgqueue.jobs"
            " where run_at > now()"
        ).fetchall()
    assert len(delayed) == 1
    args, priority, delay = delayed[0]
    assert (args, priority) == ({"user_id": 1}, Priority.HIGH)
    assert 55 <= float(delay) <= 65


@pytest.mark.slow
def test_from_sql_enqueue_redrive_cancel_and_inspect(dsn: str, new_app: Callable[..., App]) -> None:
    """The SQL block, where its example ids exist: 122 and 123 dead-lettered, 124 queued."""
    dead_letter_jobs_122_and_123(dsn, new_app)
    queued = new_app().enqueue(None, "emails.send_welcome", {"user_id": 7}, queue="emails")
    assert queued == 124

    results: list[list[tuple[Any, ...]]] = []
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(snippet(FROM_SQL).code.encode())  # as written, in one call
        while True:
            results.append(cursor.fetchall())
            if not cursor.nextset():
                break
        (enqueued,), retried, cancelled, dead_letter = results
        assert retried == [(True,)] and cancelled == [("cancelled",)]
        assert dead_letter == [(122, "emails.send_welcome", 1, "Fail: no user 5")]
        job = connection.execute(
            "select task, args, queue, priority, max_attempts, state::text,"
            " extract(epoch from run_at - created_at) from pgqueue.jobs where id = %s",
            enqueued,
        ).fetchone()
    assert job is not None
    *fields, delay = job
    assert fields == ["emails.send_welcome", {"user_id": 42}, "emails", 10, 3, "queued"]
    assert 295 <= float(delay) <= 305  # delay => interval '5 minutes'
    assert every_job_state(dsn) == {122: "dead", 123: "queued", 124: "cancelled", enqueued[0]: "queued"}


def test_the_pooler_settings_run_a_worker_through_pgbouncer(
    dsn: str, server_dsn: str, new_app: Callable[..., App]
) -> None:
    """Debian's PgBouncer with the README's [pgbouncer] settings: a job enqueued through it
    runs on a worker that reaches the database through it."""
    code = snippet(POOLER_SETTINGS).code
    assert code.splitlines()[0] == "[pgbouncer]"
    pooler = PgBouncer(server_dsn, "transaction", settings="\n".join(code.splitlines()[1:]))
    try:
        assert "pool_mode = transaction" in code
        app = new_app(dsn=pooler.through(dsn))
        app.task(name="readme.ping")(lambda: "pong")
        with running_worker(app):
            assert app.enqueue(None, "readme.ping").wait(timeout=30) == "pong"
        assert pooler.errors() == []
    finally:
        pooler.close()


def test_the_role_grants_give_each_service_its_rights(dsn: str, server_dsn: str) -> None:
    """The GRANT block as written, but to login roles of this test's own (the README's
    `web`, `workers` and `grafana` are the cluster's, which a test must not create)."""
    code = snippet(ROLE_GRANTS).code
    grants = re.findall(r"GRANT (pgqueue_\w+) TO (\w+);", code)
    assert [role for role, _ in grants] == ["pgqueue_producer", "pgqueue_worker", "pgqueue_observer"]
    suffix = uuid.uuid4().hex[:8]
    logins = {login: f"readme_{login}_{suffix}" for _, login in grants}
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for login in logins.values():
            admin.execute(sql.SQL("create role {} login").format(sql.Identifier(login)))
    try:
        with psycopg.connect(dsn, autocommit=True) as owner:
            renamed = re.sub(r"TO (\w+);", lambda found: f"TO {logins[found.group(1)]};", code)
            owner.execute(renamed.encode())
        as_role = {login: make_conninfo(dsn, user=name) for login, name in logins.items()}
        with psycopg.connect(as_role["web"], autocommit=True) as web:
            web.execute("select pgqueue.enqueue('readme.task')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                web.execute("select args from pgqueue.jobs")
        with psycopg.connect(as_role["workers"], autocommit=True) as workers:
            assert workers.execute(
                "select * from pgqueue.claim_jobs('w', array['default'], 1, 30, null)"
            ).fetchall()
        with psycopg.connect(as_role["grafana"], autocommit=True) as grafana:
            assert grafana.execute("select count(*) from pgqueue.jobs").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                grafana.execute("delete from pgqueue.active_jobs")
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            for login in logins.values():
                admin.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (login,)
                )
                admin.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(login)))


def test_the_history_questions_answer_from_a_real_run(dsn: str, new_app: Callable[..., App]) -> None:
    """Each question of the "Watching it" SQL block, after a worker dead-lettered 122 and 123
    and ran 124 and 125; 126 waits in a queue no worker serves."""
    dead_letter_jobs_122_and_123(dsn, new_app)
    app = new_app(poll_interval=0.1)

    @app.task(name="emails.send_welcome", queue="emails")
    def send_welcome(user_id: int) -> dict[str, bool]:
        return {"sent": True}

    ran = [send_welcome.enqueue(None, user_id=user_id) for user_id in (7, 8)]
    with running_worker(app, worker_id="readme-worker"):
        assert wait_for_states(dsn, ran) == {124: "succeeded", 125: "succeeded"}
    waiting = new_app().enqueue(None, "reports.build", {}, queue="reports")
    assert waiting == 126

    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(snippet(HISTORY_SQL).code.encode())
        results: list[list[tuple[Any, ...]]] = []
        while True:
            results.append(cursor.fetchall())
            if not cursor.nextset():
                break
    failures, run_times, oldest, throughput, attempts = results
    assert [(job_id, attempt, error) for job_id, attempt, _, error in failures] == [
        (122, 1, "Fail: no user 5"),
        (123, 1, "Fail: no user 6"),
    ]
    [(task, p95, succeeded)] = run_times
    assert (task, succeeded) == ("emails.send_welcome", 2) and p95 is not None and p95 >= 0
    [(queue, due, age)] = oldest
    assert queue == "reports" and due is not None and age >= 0
    assert sum(jobs for _, jobs in throughput) == 4  # two dead, two succeeded
    [(attempt, worker, outcome, started_at, seconds)] = attempts
    assert (attempt, worker, outcome) == (1, "readme-worker", "succeeded")
    assert started_at is not None and seconds >= 0


# -- Command line ----------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_line_by_line(dsn: str, tmp_path: Path, new_app: Callable[..., App]) -> None:
    """Each command of the block, in order, on the README's jobs module and a database where
    its example ids mean something: 122 and 123 are dead-lettered, 124 is queued.

    The jobs the README's workers run are enqueued by task name, so those of `resize` and
    `crunch` also prove the default names the README states (`myproject.jobs.resize`).
    """
    write_file_snippet(JOBS_MODULE, tmp_path)
    dead = dead_letter_jobs_122_and_123(dsn, new_app)
    producer = new_app()  # no tasks registered: any task name goes, like `pgqueue enqueue` without --app
    # a queue that no worker of the block serves: still queued when `pgqueue cancel 124` runs
    waiting = producer.enqueue(None, "emails.send_welcome", {"user_id": 7}, queue="reports")
    succeeding = [
        producer.enqueue(None, "emails.send_welcome", {"user_id": 42}, queue="emails"),
        producer.enqueue(None, "myproject.jobs.resize", {"path": "cat.png"}),
        producer.enqueue(None, "myproject.jobs.crunch", {"n": 3}),
    ]
    assert [*dead, waiting, *succeeding] == [122, 123, 124, 125, 126, 127]

    # quick polls only make the burst workers notice sooner that they are done
    environment = subprocess_environment(PGQUEUE_DSN=dsn, PGQUEUE_POLL_INTERVAL="0.1")
    enqueued: list[int] = []
    ran: list[str] = []

    def option(arguments: list[str], name: str) -> str:
        return arguments[arguments.index(name) + 1]

    def check(arguments: list[str], stdout: str, log: str, before: dict[int, str]) -> None:
        after = every_job_state(dsn)
        match arguments:
            case ["migrate"]:
                assert stdout.strip() == "schema up to date"  # the fixture migrated the database
            case ["worker", *options]:
                assert "burst mode ends" in log
                assert "polling only" in log if "--no-listen" in options else "LISTEN/NOTIFY" in log
                if "--queues" in options:
                    assert f"queues {option(options, '--queues')}," in log
                assert [after[job_id] for job_id in succeeding] == ["succeeded"] * 3
                assert [after[job_id] for job_id in dead] == ["dead"] * 2
                assert after[waiting] == "queued"
                assert producer.get_job(succeeding[0]).result == {"sent": True}
            case ["enqueue", task, *options]:
                job = producer.get_job(int(stdout))
                enqueued.append(job.id)
                assert (job.task, job.args, job.state) == (
                    task,
                    json.loads(option(options, "--args")),
                    "queued",
                )
                assert job.priority == Priority[option(options, "--priority").upper()]
                assert job.queue == "emails"  # the task's own queue: --app found it
                delay = (job.run_at - job.created_at).total_seconds()
                assert abs(delay - float(option(options, "--delay"))) < 5
            case ["status"]:
                # the queues with jobs waiting or dead; the default queue's jobs finished lately
                assert "emails" in stdout and "reports" in stdout and "default" not in stdout
                assert "job(s) finished" in stdout and "live workers: 0" in stdout
            case ["status", "--json"]:
                shown = json.loads(stdout)
                queues = {(row["queue"], row["state"]): row["jobs"] for row in shown["queues"]}
                assert queues == {("emails", "dead"): 1, ("emails", "ready"): 1, ("emails", "scheduled"): 1}
                # finished lately: three successes, the dead 122, the cancelled 124 (123 was redriven)
                assert (shown["finished"], shown["live_workers"]) == (5, 0)
            case ["health"]:
                # job 124 waits in a queue no worker serves (and none is running): critical
                assert stdout.splitlines()[0] == "critical"
                assert "queue 'reports': 1 ready job(s) and no live worker serves it" in stdout
            case ["health", "--json"]:
                verdict = json.loads(stdout)
                assert (verdict["status"], verdict["live_workers"]) == ("critical", 0)
            case ["retention"]:
                assert "succeeded  *                    1 day" in stdout
            case ["prune"]:
                # everything here finished moments ago: nothing is past its retention
                assert stdout.strip() == "removed 0 jobs: nothing is past its retention"
                assert after == before
            case ["prune", "--dry-run"]:
                assert stdout.strip() == "would remove 0 jobs: nothing is past its retention"
            case ["job", job_id]:
                shown = json.loads(stdout)
                assert (shown["id"], shown["state"]) == (int(job_id), before[int(job_id)])
                if shown["state"] == "dead":
                    assert shown["errors"][-1]["error"] == f"Fail: no user {shown['args']['user_id']}"
            case ["dead"]:
                listed = {int(number) for number in re.findall(r"^\s*(\d+)\s", stdout, re.MULTILINE)}
                assert listed == {job_id for job_id, state in before.items() if state == "dead"}
            case ["dead", "--retry-all"]:
                redriven = [job_id for job_id, state in before.items() if state == "dead"]
                assert redriven and f"requeued {len(redriven)} job(s)" in stdout
                assert "dead" not in after.values()
            case ["retry", job_id]:
                assert stdout.strip() == f"job {job_id} requeued"
                assert (before[int(job_id)], after[int(job_id)]) == ("dead", "queued")
            case ["cancel", job_id]:
                assert stdout.strip() == f"job {job_id} cancelled"
                assert (before[int(job_id)], after[int(job_id)]) == ("queued", "cancelled")
            case ["queue", "pause", queue]:
                assert stdout.splitlines()[1].split() == [queue, "yes", "-", "-", "-", "0", "-", "-"]
            case ["queue", "resume", _]:
                assert "no queue has controls" in stdout
            case ["queue", "limit", queue, *_]:
                assert stdout.splitlines()[1].split() == [queue, "no", "3", "50", "50", "0", "-", "2"]
            case ["queue", "list"]:
                assert stdout.splitlines()[1].split() == ["emails", "no", "3", "50", "50", "0", "-", "2"]
            case ["cron", "list"]:
                assert "(no schedules" in stdout  # the README's jobs module declares none
            case ["events", "status"]:
                assert stdout.strip() == "events are off"
            case ["roles", *_]:
                listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("pgqueue_")]
                assert listed == ["pgqueue_producer", "pgqueue_worker", "pgqueue_observer"]
            case _:
                raise AssertionError(f"no check for `pgqueue {shlex.join(arguments)}`")

    for words in command_forms(snippet(COMMAND_LINE)):
        assert words[0] == "pgqueue", f"`{shlex.join(words)}` is not a pgqueue command"
        arguments = words[1:]
        if arguments[0] == "worker":
            arguments.append("--burst")
        before = every_job_state(dsn)
        completed = run(pgqueue_command(*arguments), tmp_path, environment)
        expected = 2 if arguments[0] == "health" else 0  # critical: see its check
        assert completed.returncode == expected, describe(f"pgqueue {shlex.join(arguments)}", completed)
        check([word for word in arguments if word != "--burst"], completed.stdout, completed.stderr, before)
        ran.append(arguments[0])

    assert sorted(set(ran)) == sorted(RUNNABLE_SUBCOMMANDS[COMMAND_LINE])
    # 123 redriven by `pgqueue retry`, 122 by `pgqueue dead --retry-all`, 124 cancelled
    assert every_job_state(dsn) == {
        122: "queued",
        123: "queued",
        124: "cancelled",
        125: "succeeded",
        126: "succeeded",
        127: "succeeded",
        **dict.fromkeys(enqueued, "queued"),
    }


# -- Task names and size limits ------------------------------------------------------


def stated_limit(text: str, phrase: str) -> tuple[int, str]:
    """The bytes the README states after `phrase`, and the constant it names for them."""
    words = r"\s+".join(map(re.escape, phrase.split()))
    found = re.search(words + r"\s+([\d,]+)\s+bytes\s+\(`([\w.]+)`\)", text)
    assert found, f"README.md no longer says `{phrase} N bytes (`module.CONSTANT`)`: update this test"
    return int(found.group(1).replace(",", "")), found.group(2)


@pytest.mark.slow
def test_the_size_limits_the_readme_states(dsn: str, new_app: Callable[..., App]) -> None:
    """Arguments and results exactly at the stated limits are kept, one byte more is refused,
    and the constants the README names hold those numbers."""
    text = README.read_text()
    arguments_limit, arguments_constant = stated_limit(
        text, "A job's arguments are one JSON object of at most"
    )
    result_limit, result_constant = stated_limit(
        text, "A handler's return value is stored as JSON too, up to"
    )
    for limit, constant in ((arguments_limit, arguments_constant), (result_limit, result_constant)):
        module, _, name = constant.rpartition(".")
        assert getattr(importlib.import_module(module), name) == limit, constant
    app = new_app(poll_interval=0.1)

    @app.task(name="store")
    def store(data: str) -> None: ...

    @app.task(name="produce")
    def produce(length: int) -> str:
        return "x" * length  # its JSON is length + 2 bytes, the quotes

    wrapping = len('{"data":""}')
    at_limit = store.enqueue(None, data="x" * (arguments_limit - wrapping))
    with pytest.raises(InvalidJobError, match=f"the limit is {arguments_limit}"):
        store.enqueue(None, data="x" * (arguments_limit - wrapping + 1))
    result_at_limit = produce.enqueue(None, length=result_limit - 2)
    result_over = produce.enqueue(None, length=result_limit - 1)
    with running_worker(app):
        states = wait_for_states(dsn, [at_limit, result_at_limit, result_over])
    assert states == {at_limit: "succeeded", result_at_limit: "succeeded", result_over: "dead"}
    assert "InvalidResultError" in app.get_job(result_over).errors[-1]["error"]


# -- Testing your own tasks ------------------------------------------------------------


@pytest.mark.slow
def test_the_testing_helpers_example_passes_as_a_users_suite(
    dsn: str, server_dsn: str, tmp_path: Path
) -> None:
    """The README's conftest.py and test, with its jobs module, run by pytest as a user would."""
    for key in (JOBS_MODULE, EAGER_TEST, TESTING_CONFTEST, TESTING_TEST):
        write_file_snippet(key, tmp_path)

    def leftovers() -> set[str]:
        with psycopg.connect(server_dsn, autocommit=True) as connection:
            rows = connection.execute(
                "select datname from pg_database where datname like 'myproject\\_%'"
            ).fetchall()
        return {str(name) for (name,) in rows}

    before = leftovers()
    completed = run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        tmp_path,
        subprocess_environment(PGQUEUE_DSN=dsn),  # the server of the user's databases
    )
    assert completed.returncode == 0, describe("pytest on the README's example", completed)
    assert re.search(r"\b2 passed\b", completed.stdout), completed.stdout
    assert leftovers() == before  # the template and the clone were dropped


# -- Following a job, periodic jobs, events ---------------------------------------------


def run_script(key: SnippetKey, directory: Path, dsn: str) -> str:
    """Run a script block as written; its stdout."""
    block = snippet(key)
    script = directory / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    completed = run([sys.executable, str(script)], directory, subprocess_environment(PGQUEUE_DSN=dsn))
    assert completed.returncode == 0, describe(f"the script at README.md line {block.line}", completed)
    return completed.stdout


@pytest.mark.slow
def test_a_handle_waits_reads_progress_and_cancels(
    dsn: str, tmp_path: Path, worker_processes: WorkerProcesses
) -> None:
    for key in (JOBS_MODULE, REPORTS_MODULE):
        write_file_snippet(key, tmp_path)
    worker_processes.start(dsn, app="myproject.reports:app")
    lines = run_script(HANDLES_EXAMPLE, tmp_path, dsn).splitlines()
    assert lines == ["5 pages", "succeeded 100.0", "cancelling", "cancelled"]


@pytest.mark.slow
def test_periodic_jobs_declared_added_and_listed(
    dsn: str, tmp_path: Path, worker_processes: WorkerProcesses
) -> None:
    for key in (JOBS_MODULE, PERIODIC_MODULE):
        write_file_snippet(key, tmp_path)
    worker = worker_processes.start(dsn, app="myproject.periodic:app")
    worker.wait_for_output("declared 1 periodic schedule(s)")
    run_script(SCHEDULES_ADD, tmp_path, dsn)
    environment = subprocess_environment(PGQUEUE_DSN=dsn)
    outputs = []
    for words in command_forms(snippet(CRON_COMMANDS)):
        completed = run(pgqueue_command(*words[1:]), tmp_path, environment)
        assert completed.returncode == 0, describe(shlex.join(words), completed)
        outputs.append((words[1:], completed.stdout))
    listed = dict((tuple(arguments), stdout) for arguments, stdout in outputs)
    table = listed["cron", "list"].splitlines()
    assert table[1].split()[:4] == ["nightly-report", "0", "2", "*"]
    assert table[2].split()[:7] == ["prices.sync", "*/5", "*", "*", "*", "*", "Europe/Paris"]
    assert listed["cron", "pause", "nightly-report"].strip() == "schedule nightly-report paused"


@pytest.mark.slow
def test_the_events_example_sees_its_job_end(
    dsn: str, tmp_path: Path, worker_processes: WorkerProcesses
) -> None:
    for key in (JOBS_MODULE, REPORTS_MODULE):
        write_file_snippet(key, tmp_path)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("select pgqueue.enable_events()")  # `pgqueue events on`
    worker_processes.start(dsn, app="myproject.reports:app")
    lines = run_script(EVENTS_EXAMPLE, tmp_path, dsn).splitlines()
    assert lines[0] == "succeeded"


# -- Hooks -----------------------------------------------------------------------------

HOOKS_DRIVER = """
import json

import pgqueue
from hooks_example import app, finished

@app.task(name="welcome")
def welcome() -> None: ...

@app.task(name="refused")
def refused() -> None:
    raise pgqueue.Fail("no")

welcome.enqueue(None)
refused.enqueue(None)
pgqueue.Worker(app, burst=True, install_signal_handlers=False).run()
print(json.dumps(finished))
"""


@pytest.mark.slow
def test_the_hooks_example_counts_what_a_worker_finished(dsn: str, tmp_path: Path) -> None:
    """The block as a module of the user's; a burst worker of its app runs a job that succeeds
    and one that fails for good, and the example's counter saw both."""
    (tmp_path / "hooks_example.py").write_text(snippet(HOOKS_EXAMPLE).code)
    driver = tmp_path / "drive_hooks_example.py"
    driver.write_text(HOOKS_DRIVER)
    completed = run([sys.executable, str(driver)], tmp_path, subprocess_environment(PGQUEUE_DSN=dsn))
    assert completed.returncode == 0, describe("the Hooks example under a burst worker", completed)
    assert json.loads(completed.stdout) == {"succeeded": 1, "fatal": 1}
