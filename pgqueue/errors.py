"""Typed errors raised at pgqueue's edges, so callers can tell bad input from bad luck."""

from __future__ import annotations


class PgQueueError(Exception):
    """Base class of every error pgqueue raises on purpose."""


class InvalidJobError(PgQueueError, ValueError):
    """A job was described wrongly: bad option, bad arguments, payload not JSON."""


class UnknownTaskError(InvalidJobError, LookupError):
    """The task name is not registered in the app."""


class ConfigurationError(PgQueueError, ValueError):
    """A setting is wrong: bad DSN, bad import path, missing extra."""


class DatabaseUnavailableError(PgQueueError):
    """The database cannot be reached in time (down, unreachable, or out of connections)."""


class SchemaError(PgQueueError):
    """The database schema does not fit this version of pgqueue."""


class SchemaNotMigratedError(SchemaError):
    """The pgqueue schema is missing or older than this code: run `pgqueue migrate`."""


class SchemaTooNewError(SchemaError):
    """The database was migrated by a newer pgqueue than this one."""


class MigrationLockTimeoutError(SchemaError):
    """A migration could not get a lock on a pgqueue table in time (a long transaction holds one)."""


class MigrationChecksumError(SchemaError):
    """A migration that was already applied has been edited since."""


class JobNotFoundError(PgQueueError, LookupError):
    """No job has that id."""


class JobFinishedError(PgQueueError):
    """The job already ended (succeeded, dead or cancelled): it cannot be cancelled."""

    def __init__(self, message: str, job_id: int, state: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class JobFailedError(PgQueueError):
    """`wait()` found the job dead-lettered or cancelled: `state` says which, `errors`
    holds every attempt's error (the last one is in the message)."""

    def __init__(self, message: str, job_id: int, state: str, errors: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.errors = errors


class UnknownQueueError(PgQueueError, LookupError):
    """No job, registered task or live worker has a queue of that name."""


class QueueFull(PgQueueError):
    """The queue holds as many waiting jobs as its maximum depth allows: try again later
    (a web app answers 503 with Retry-After). Nothing of the refused enqueue was written."""

    def __init__(self, message: str, queue: str, depth: int, max_depth: int) -> None:
        super().__init__(message)
        self.queue = queue
        self.depth = depth
        self.max_depth = max_depth


class PreparedStatementsLost(ConfigurationError):
    """A connection pooler in transaction mode (PgBouncer) sits between pgqueue and the
    server and does not keep prepared statements: the message names the setting to change."""


class PermissionDeniedError(ConfigurationError):
    """The database role lacks a right pgqueue needs: the message names the role to grant."""
