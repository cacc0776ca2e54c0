"""A real PostgreSQL server for tests, from the binaries of the `pgserver` package.

Listens on 127.0.0.1 with password authentication, as a production server would. Postgres
refuses to run as root, so under root it runs as an unprivileged system user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2

# The binaries only; importing pgserver itself would set up its own server bookkeeping.
POSTGRES_BIN_PATH = Path(importlib.util.find_spec("pgserver").submodule_search_locations[0]) / "pginstall" / "bin"

_SERVICE_USER = "tradeforge-pg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _SERVICE_USER], check=True)
    return _SERVICE_USER


class PostgresServer:
    user = "tradeforge"
    password = "test-only-password"
    database = "dagster"

    def __init__(self) -> None:
        # Directly under the temp dir: the service user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="tradeforge-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._run_as = _service_user()

    def _run(self, *args: str) -> None:
        done = subprocess.run(list(args), user=self._run_as, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        if self._run_as:
            shutil.chown(self.root, user=self._run_as)
            os.chmod(self.root, 0o700)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._run_as:
            shutil.chown(pwfile, user=self._run_as)
        self._run(str(POSTGRES_BIN_PATH / "initdb"), "-D", str(self.data), "-U", self.user,
                  "--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8")
        self._run(str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg2.connect(**self.connect_args("postgres")) as conn:
                    conn.autocommit = True
                    break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn = psycopg2.connect(**self.connect_args("postgres"))
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {self.database}")
        conn.close()

    def stop(self) -> None:
        subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       user=self._run_as, capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def connect_args(self, database: str | None = None) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "user": self.user, "password": self.password,
                "dbname": database or self.database}

    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables that point Dagster at this server."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.database}
