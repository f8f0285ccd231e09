"""Logging: pgqueue logs through the standard `logging` module, as the "pgqueue" logger.

Every job's state changes are logged with its id, task, queue and attempt (and how
long it ran) both in the message and as fields of the record (`job_id`, `task`,
`queue`, `attempt`, `seconds`, `outcome`), which the JSON format writes as keys:
a job starting or succeeding at DEBUG, a failure, a hand-back, a dead letter or a
lost lease at WARNING. `pgqueue --log-format json` (or `PGQUEUE_LOG_FORMAT=json`)
writes one JSON object per line.

The JSON formatter is written here rather than taken from python-json-logger: it is
twenty lines, and a dependency of every worker for it would be more to keep.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .models import ClaimedJob

if TYPE_CHECKING:  # outcomes logs with job_fields: a type here, not an import
    from .outcomes import Outcome

log = logging.getLogger("pgqueue")

FIELDS = ("job_id", "task", "queue", "attempt", "seconds", "outcome", "worker")
FORMATS = ("text", "json")


def job_fields(job: ClaimedJob, **more: Any) -> dict[str, Any]:
    """`extra=` fields of a log record about `job`."""
    return {"job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempt, **more}


def log_job_started(job: ClaimedJob) -> None:
    log.debug(
        "job %d %s (queue %s) attempt %d started",
        job.id,
        job.task,
        job.queue,
        job.attempt,
        extra=job_fields(job),
    )


def log_job_finished(job: ClaimedJob, outcome: str, seconds: float) -> None:
    log.debug(
        "job %d %s (queue %s) attempt %d: %s in %.3fs",
        job.id,
        job.task,
        job.queue,
        job.attempt,
        outcome,
        seconds,
        extra=job_fields(job, outcome=outcome, seconds=round(seconds, 6)),
    )


def outcome_fields(outcome: Outcome, final: str) -> dict[str, Any]:
    """`extra=` fields of a log record about a recorded `outcome` (`final`: what became of the job)."""
    fields: dict[str, Any] = {
        "job_id": outcome.job_id,
        "task": outcome.task,
        "queue": outcome.queue,
        "attempt": outcome.attempt,
        "outcome": final,
    }
    if outcome.started_at is not None and outcome.ended_at is not None:
        fields["seconds"] = round(outcome.ended_at - outcome.started_at, 6)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the job fields, an exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int, format: str) -> None:
    """Log to stderr at `level`, as text or as JSON lines (the command line's setup)."""
    handler = logging.StreamHandler()
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
