"""A real PgBouncer (Debian's package; `.ci/run` installs it) on loopback, in front of the
test server, in transaction or session pooling mode. Never a stand-in."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.clusters import free_port


class PgBouncer:
    """One pgbouncer process; `through(dsn)` rewrites a database DSN to go through it."""

    def __init__(
        self,
        server_dsn: str,
        mode: str,
        users: tuple[str, ...] = ("postgres",),
        pool_size: int = 10,
        settings: str = "",
    ) -> None:
        """`settings`: lines of a [pgbouncer] section, over this one's (the last one wins)."""
        binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
        if binary is None:
            pytest.skip("PgBouncer is not installed (apt-get install pgbouncer; .ci/run does)")
        target = conninfo_to_dict(server_dsn)
        host = str(target.get("host") or "")
        if not host or host.startswith("/"):
            pytest.skip(
                "PgBouncer is tested in front of a server reached over TCP; this one listens on a Unix socket"
            )
        self.mode = mode
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="pgqueue-pgbouncer-"))
        self.log_path = self.directory / "pgbouncer.log"
        auth = self.directory / "users.txt"
        auth.write_text("".join(f'"{user}" ""\n' for user in users))
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={target.get('port') or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.directory}\n"
            "auth_type = trust\n"
            f"auth_file = {auth}\n"
            f"pool_mode = {mode}\n"
            "max_client_conn = 400\n"
            f"default_pool_size = {pool_size}\n"
            f"logfile = {self.log_path}\n"
            "server_reset_query = DISCARD ALL\n"
            f"{settings}\n"
        )
        command = [binary, str(config)]
        user: str | None = None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no 'postgres' user to run PgBouncer as")
            shutil.chown(self.directory, "postgres")
            for path in self.directory.iterdir():
                shutil.chown(path, "postgres")
            user = "postgres"  # not runuser, which holds a SIGTERM 2 s before passing it on
        # its output to a file: a pipe nobody reads fills, and PgBouncer blocks writing to it
        with open(self.directory / "stderr.log", "wb") as output:
            self._process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=output, user=user, group=user
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    error = (self.directory / "stderr.log").read_text(errors="replace")
                    log = self.log()
                    self.close()
                    raise RuntimeError(f"PgBouncer did not start: {error}{log}") from None
                time.sleep(0.05)

    def through(self, dsn: str) -> str:
        return make_conninfo(dsn, host="127.0.0.1", port=self.port)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def errors(self) -> list[str]:
        """What PgBouncer itself logged at WARNING or above: a refused login or start-up
        parameter, a broken server connection. The server's errors it passes on unlogged:
        those surface as exceptions and pgqueue's warnings, which the tests check."""
        return [
            line
            for line in self.log().splitlines()
            if " ERROR " in line or " WARNING " in line or " FATAL " in line
        ]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
