"""Settings from PGQUEUE_* environment variables and a .env file (CLI flags override)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigurationError
from .models import describe_validation_error


class Settings(BaseSettings):
    """Everything a producer or worker can be told; build it once at the entry point."""

    model_config = SettingsConfigDict(
        env_prefix="PGQUEUE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    dsn: str | None = Field(
        default=None,
        description="libpq connection string or URI; unset starts an embedded Postgres",
    )
    data_dir: Path = Field(
        default=Path(".pgqueue/postgres"),
        description="data directory of the embedded Postgres used when no DSN is set",
    )
    app: str | None = Field(default=None, description="default module:attribute of the app")
    queues: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="queues a worker serves (comma-separated); default: its tasks' queues"
    )
    concurrency: int = Field(default=10, ge=1, le=10_000)
    listen: bool = Field(default=True, description="wake on LISTEN/NOTIFY; false polls only")
    listen_dsn: str | None = Field(
        default=None,
        description="a direct connection (not through a transaction pooler) for LISTEN; unset: the "
        "DSN, where a worker that finds a pooler there polls instead",
    )
    prepared_statements: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="prepare repeated statements: auto turns them off behind a pooler it detects "
        "(PgBouncer), on keeps them (PgBouncer 1.21+ with max_prepared_statements), off never",
    )
    poll_interval: float = Field(default=1.0, gt=0, description="seconds between polls when idle")
    lease_seconds: float = Field(
        default=30.0, gt=0, description="a running job is rescued this long after its last heartbeat"
    )
    rescue_interval: float = Field(default=5.0, gt=0, description="seconds between rescue sweeps")
    priority_aging: float | None = Field(
        default=300.0,
        gt=0,
        description="seconds a due job may wait before the maintenance leader promotes it to the top "
        "priority waiting in its queue (no starvation of low priorities); unset (none) turns it off",
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="seconds running jobs get to finish after SIGTERM/SIGINT"
    )
    pool_size: int = Field(default=4, ge=1, description="connections in the app's producer pool")
    connect_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds a producer waits for a connection from the app's pool before it gives up "
        "with DatabaseUnavailableError (a web request must not hang on a database that is down)",
    )
    statement_timeout: float = Field(
        default=30.0, gt=0, description="seconds a worker waits on one database call before reconnecting"
    )
    reconnect_max_delay: float = Field(default=10.0, gt=0, description="cap of reconnect backoff")
    handback_delay: float = Field(
        default=10.0,
        ge=0,
        description="seconds a job this worker cannot run (task unknown here, arguments that do not "
        "fit) waits before it is offered again, to a worker that knows it",
    )
    unknown_task_timeout: float = Field(
        default=3600.0,
        ge=0,
        description="a job handed back that way for this long (from its first hand-back) is dead-lettered",
    )

    log_format: Literal["text", "json"] = Field(
        default="text", description="the command line's log lines: text, or one JSON object per line"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve /metrics and /health on this port (a worker; 0 picks a free port); "
        "unset serves nothing",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the metrics port listens on (0.0.0.0 for a Prometheus on another host)",
    )
    health_max_ready_age: float = Field(
        default=300.0,
        gt=0,
        description="health: a queue whose oldest ready job waited longer than this is degraded",
    )
    health_dead_window: float = Field(
        default=900.0,
        gt=0,
        description="health: jobs dead-lettered within this many seconds make the queue degraded",
    )

    def __init__(self, **values: Any) -> None:
        # A bad setting is bad input at the edge: pgqueue's typed error, not pydantic's.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigurationError(describe_validation_error(error, "invalid settings")) from None

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: object) -> object:
        # PGQUEUE_QUEUES=emails,reports reads as a list, like --queues on the command line
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()] or None
        return value

    @field_validator("prepared_statements", mode="before")
    @classmethod
    def _on_off(cls, value: object) -> object:
        # PGQUEUE_PREPARED_STATEMENTS=false reads as off, true as on
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            spelled = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(
                spelled, spelled
            )
        return value

    @field_validator("priority_aging", mode="before")
    @classmethod
    def _aging_off(cls, value: object) -> object:
        # PGQUEUE_PRIORITY_AGING=off (or none, or 0) turns aging off
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none", "0"):
            return None
        if value == 0:
            return None
        return value
