"""Settings: PGQUEUE_* environment variables, a .env file, and typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgqueue import App, ConfigurationError, Settings, Worker
from pgqueue.database import redact, validate_dsn


def test_environment_variables_and_comma_separated_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_QUEUES", "emails, reports")
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "25")
    monkeypatch.setenv("PGQUEUE_LISTEN", "false")
    settings = Settings()
    assert settings.queues == ["emails", "reports"]
    assert settings.concurrency == 25 and settings.listen is False
    assert Settings(concurrency=3).concurrency == 3  # explicit values (CLI flags) win


def test_dot_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PGQUEUE_DSN=postgresql://u@db.example/app\nPGQUEUE_LEASE_SECONDS=12\n")
    settings = Settings()
    assert settings.dsn == "postgresql://u@db.example/app" and settings.lease_seconds == 12


def test_bad_settings_are_refused_with_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUEUE_CONCURRENCY", "0")
    with pytest.raises(
        ConfigurationError, match=r"invalid settings: concurrency: .*greater than or equal to 1"
    ):
        Settings()
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        Settings(lease_seconds=-1)
    with pytest.raises(ConfigurationError, match="poll_interval"):
        App(Settings(poll_interval="often"))


def test_no_setting_leaks_in_from_the_developers_environment() -> None:
    # the autouse fixture cleared PGQUEUE_* and moved to an empty directory: defaults only
    assert Settings() == Settings.model_construct()


def test_dsn_is_checked_and_its_password_never_shown() -> None:
    with pytest.raises(ConfigurationError, match="invalid database DSN"):
        validate_dsn("host=a port")
    assert "secret" not in redact("postgresql://me:secret@db/app")
    assert "***" in redact("postgresql://me:secret@db/app")


def test_prepared_statements_read_auto_on_off_or_a_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().prepared_statements == "auto"
    for given, read in (("off", "off"), ("false", "off"), ("0", "off"), ("ON", "on"), ("true", "on")):
        monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", given)
        assert Settings().prepared_statements == read
    monkeypatch.setenv("PGQUEUE_PREPARED_STATEMENTS", "sometimes")
    with pytest.raises(ConfigurationError, match="prepared_statements"):
        Settings()
    monkeypatch.setenv("PGQUEUE_LISTEN_DSN", "postgresql://direct/db")
    monkeypatch.delenv("PGQUEUE_PREPARED_STATEMENTS")
    assert Settings().listen_dsn == "postgresql://direct/db"


def test_a_listen_dsn_libpq_cannot_parse_is_a_configuration_error(dsn: str) -> None:
    app = App(Settings(dsn=dsn, listen_dsn="host='unterminated"))
    app.task(name="anything")(lambda: None)
    with pytest.raises(ConfigurationError, match="invalid database DSN"):
        app.subscribe()
    worker = Worker(app, install_signal_handlers=False)
    with pytest.raises(ConfigurationError, match="invalid database DSN"):
        worker.run()
    app.close()
