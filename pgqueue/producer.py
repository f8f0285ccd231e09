"""Writes jobs: one at a time (one INSERT), or many at once (COPY), sync or async."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from .errors import ConfigurationError, InvalidJobError, QueueFull
from .models import JobId, JobOptions, validate_task_name
from .payloads import UnstorableJson, encode_json
from .plans import Plan, atomic, atomic_async, drive, drive_async
from .pooling import prepare_flag
from .sql import query

log = logging.getLogger("pgqueue")

# Payloads larger than this are refused at the edge: a job row is read on every claim,
# and big blobs belong in a table of their own with the job carrying the key.
MAX_ARGS_BYTES = 1_000_000


@dataclass(frozen=True)
class PreparedJob:
    """A validated job, ready to be written."""

    task: str
    args_json: str
    options: JobOptions
    # For a task this process does not know: the options the caller gave. The others
    # come from the task's registration in the database (see insert_job_by_name).
    given: frozenset[str] | None = None

    def params(self) -> dict[str, Any]:
        options = self.options
        if self.given is not None:
            return _by_name(self, self.given)
        return {
            "task": self.task,
            "args": self.args_json,
            "queue": options.queue,
            "priority": options.priority,
            "run_at": options.run_at,
            "delay": options.delay,
            "max_attempts": options.max_attempts,
            "timeout_seconds": options.timeout,
            "backoff": options.retry.kind,
            "backoff_base_seconds": options.retry.base,
            "backoff_max_seconds": options.retry.max,
            "backoff_jitter": options.retry.jitter,
        }


_PARAMS_OF_OPTION = {
    "queue": ("queue",),
    "priority": ("priority",),
    "max_attempts": ("max_attempts",),
    "timeout": ("timeout_seconds",),
    "retry": ("backoff", "backoff_base_seconds", "backoff_max_seconds", "backoff_jitter"),
}


def _by_name(job: PreparedJob, given: frozenset[str]) -> dict[str, Any]:
    params = PreparedJob(job.task, job.args_json, job.options).params()
    for option, names in _PARAMS_OF_OPTION.items():
        if option not in given:
            for name in names:
                params[name] = None  # the registration's value, or the default
    return params


def encode_args(task: str, args: dict[str, Any]) -> str:
    """Serialise a job's arguments, or say exactly why they cannot be stored."""
    try:
        return encode_json(args, MAX_ARGS_BYTES)
    except UnstorableJson as error:
        raise InvalidJobError(f"arguments of task {task!r} cannot be stored: {error}") from None
    except (TypeError, ValueError) as error:
        raise InvalidJobError(f"arguments of task {task!r} must be JSON-serialisable: {error}") from None


def prepare(task: str, args: dict[str, Any], options: JobOptions) -> PreparedJob:
    """Validate and serialise one job."""
    return PreparedJob(validate_task_name(task), encode_args(task, args), options)


def _insert_plan(job: PreparedJob) -> Plan[JobId]:
    key = job.options.unique_key
    params = job.params()
    if key is not None:
        # a key a live job holds: its id, and nothing inserted (a full queue is no obstacle)
        params["unique_key"] = key
    if job.given is None:
        rows = yield query("insert_job" if key is None else "insert_unique_job"), params
        assert rows
        job_id, held = int(rows[0][0]), key is not None and bool(rows[0][1])
    else:
        params.setdefault("unique_key", None)
        rows = yield query("insert_job_by_name"), params
        assert rows
        job_id, registered = int(rows[0][0]), rows[0][1]
        held = bool(rows[0][2])
        if not registered:
            log.warning(
                "enqueued job %d of task %r, which no worker has registered (yet): check the name",
                job_id,
                job.task,
            )
    if key is None:
        return JobId(job_id)
    if held:
        return JobId(job_id, True)
    # the new job takes its key, or gives way (removed again, unseen) to a job that took
    # it meanwhile
    rows = yield (
        query("take_job_key"),
        {
            "task": job.task,
            "key": key,
            "id": job_id,
            "window": job.options.unique_for,
        },
    )
    assert rows
    holder, duplicate = rows[0]
    return JobId(int(holder), bool(duplicate))


def _insert_each_plan(jobs: Sequence[PreparedJob]) -> Plan[list[int]]:
    """One job after the other (each a JobId, which says whether it was a duplicate)."""
    ids: list[int] = []
    for job in jobs:
        ids.append((yield from _insert_plan(job)))
    return ids


_FULL = re.compile(r"queue=(?P<queue>\S+) depth=(?P<depth>\d+) max_depth=(?P<max_depth>\d+)")


@contextlib.contextmanager
def _refused_when_full() -> Iterator[None]:
    """The queue's maximum depth (0012) refused the enqueue: QueueFull, with the depth."""
    try:
        yield
    except psycopg.errors.ConfigurationLimitExceeded as error:
        found = _FULL.fullmatch(error.diag.message_detail or "")
        if found is None:
            raise
        raise QueueFull(
            (error.diag.message_primary or str(error)).strip(),
            found["queue"],
            int(found["depth"]),
            int(found["max_depth"]),
        ) from None


def insert(connection: psycopg.Connection[Any], job: PreparedJob) -> JobId:
    """Insert one job on `connection`, in whatever transaction it has open."""
    with _refused_when_full():
        if job.options.unique_key is None:
            return drive(connection, _insert_plan(job))
        with atomic(connection):  # the job and its key, or neither
            return drive(connection, _insert_plan(job))


async def insert_async(connection: psycopg.AsyncConnection[Any], job: PreparedJob) -> JobId:
    """The async twin of `insert`."""
    with _refused_when_full():
        if job.options.unique_key is None:
            return await drive_async(connection, _insert_plan(job))
        async with atomic_async(connection):
            return await drive_async(connection, _insert_plan(job))


def _refuse_by_name(jobs: Sequence[PreparedJob]) -> None:
    # COPY writes every option as given: it cannot look up a task's registration
    unknown = sorted({job.task for job in jobs if job.given is not None})
    if unknown:
        raise ConfigurationError(
            f"bulk enqueue needs its tasks registered in this app, not only by the workers: {unknown}; "
            "enqueue them one by one (which applies the workers' registration) or register them"
        )


def _copy_rows(jobs: Sequence[PreparedJob], ids: list[int], now: datetime) -> Iterator[tuple[Any, ...]]:
    for job, job_id in zip(jobs, ids, strict=True):
        options = job.options
        run_at: datetime = options.run_at or now + timedelta(seconds=options.delay)
        yield (
            job_id,
            job.task,
            job.args_json,
            options.queue,
            options.priority,
            run_at,
            options.max_attempts,
            options.timeout,
            options.retry.kind,
            options.retry.base,
            options.retry.max,
            options.retry.jitter,
        )


def insert_many(connection: psycopg.Connection[Any], jobs: Sequence[PreparedJob]) -> list[int]:
    """Write many jobs with one COPY; returns their ids in order.

    The ids are reserved first (one round trip) because COPY returns none.
    """
    if not jobs:
        return []
    _refuse_by_name(jobs)
    with _refused_when_full():
        if any(job.options.unique_key is not None for job in jobs):
            # COPY cannot give way to a key's holder: one statement pair per job instead
            with atomic(connection):
                return list(drive(connection, _insert_each_plan(jobs)))
        with atomic(connection):
            reserved = connection.execute(
                query("reserve_ids"), {"count": len(jobs)}, prepare=prepare_flag(connection)
            ).fetchone()
            assert reserved is not None
            ids, now = reserved
            with connection.cursor().copy(query("copy_jobs")) as copy:
                for row in _copy_rows(jobs, ids, now):
                    copy.write_row(row)
    return list(ids)


async def insert_many_async(
    connection: psycopg.AsyncConnection[Any], jobs: Sequence[PreparedJob]
) -> list[int]:
    """The async twin of `insert_many`."""
    if not jobs:
        return []
    _refuse_by_name(jobs)
    with _refused_when_full():
        if any(job.options.unique_key is not None for job in jobs):
            async with atomic_async(connection):
                return list(await drive_async(connection, _insert_each_plan(jobs)))
        async with atomic_async(connection):
            cursor = await connection.execute(
                query("reserve_ids"), {"count": len(jobs)}, prepare=prepare_flag(connection)
            )
            reserved = await cursor.fetchone()
            assert reserved is not None
            ids, now = reserved
            async with connection.cursor().copy(query("copy_jobs")) as copy:
                for row in _copy_rows(jobs, ids, now):
                    await copy.write_row(row)
    return list(ids)
