"""The warehouse: ClickHouse through clickhouse-connect, a server or the embedded chDB engine.

One client library and one SQL dialect in both settings. The embedded engine (chDB) lets one
process at a time hold a data directory, so every operation here opens a short-lived
client, and opening retries with backoff while another process holds the directory, up to
``lock_timeout_s``, then fails with :class:`WarehouseBusyError` naming the path.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import clickhouse_connect
import polars as pl
from clickhouse_connect.driver.client import Client
from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from resources.warehouse.migrations import apply_migrations

log = logging.getLogger(__name__)

_LOCK_MARKERS = ("Error initializing EmbeddedServer", "Cannot lock file", "is locked")
_OTHER_DIR_MARKER = "already initialized with path"
_migrated: set[str] = set()
_process_lock = threading.RLock()  # one embedded client per process at a time


class WarehouseError(RuntimeError):
    """The warehouse cannot be reached or used as configured."""


class WarehouseBusyError(WarehouseError):
    """The embedded warehouse stayed locked by another process past the timeout."""


def default_home() -> Path:
    """Root of local state (warehouse, Dagster home, ...): ``$TRADEFORGE_HOME`` or ``./.tradeforge``."""
    return Path(os.environ.get("TRADEFORGE_HOME", ".tradeforge")).resolve()


class WarehouseResource(ConfigurableResource):
    """ClickHouse warehouse. Set ``url`` or ``host`` for a server; leave both unset for the
    embedded engine under ``embedded_path``."""

    url: str | None = Field(default=None, description="clickhouse-connect DSN, e.g. https://user:pass@host:8443/db")
    host: str | None = Field(default=None, description="ClickHouse server host (HTTP interface)")
    port: int | None = Field(default=None, description="HTTP(S) port; 8123 or 8443 when unset")
    username: str = "default"
    password: str = ""
    database: str = "tradeforge"
    secure: bool = False
    embedded_path: str | None = Field(default=None, description="embedded data directory; $TRADEFORGE_HOME/warehouse when unset")
    lock_timeout_s: float = Field(default=120.0, description="how long to wait for a locked embedded warehouse")

    @property
    def embedded_dir(self) -> Path:
        return Path(self.embedded_path).resolve() if self.embedded_path else default_home() / "warehouse"

    @property
    def is_embedded(self) -> bool:
        return not self.url and not self.host

    def describe(self) -> str:
        """Where the data lives, without credentials."""
        if self.is_embedded:
            return f"embedded chDB at {self.embedded_dir} (database {self.database})"
        if self.url:
            from urllib.parse import urlsplit

            parts = urlsplit(self.url)
            return f"ClickHouse server {parts.hostname}:{parts.port or ''} (database {self.database})"
        return f"ClickHouse server {self.host}:{self.port or (8443 if self.secure else 8123)} (database {self.database})"

    # -- connections ---------------------------------------------------------------------
    def _open(self) -> Client:
        if self.is_embedded:
            path = self.embedded_dir
            path.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")
        if self.url:
            return clickhouse_connect.get_client(dsn=self.url)
        return clickhouse_connect.get_client(
            host=self.host, port=self.port or 0, username=self.username, password=self.password, secure=self.secure
        )

    def _open_with_retry(self) -> Client:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._open()
            except Exception as exc:  # clickhouse-connect wraps engine errors in several types
                message = str(exc)
                if _OTHER_DIR_MARKER in message:
                    raise WarehouseError(
                        f"this process already uses another embedded warehouse; chDB serves one data "
                        f"directory per process. Asked for {self.describe()}: {message}"
                    ) from exc
                retryable = any(m in message for m in _LOCK_MARKERS) if self.is_embedded else attempts < 4
                if not retryable:
                    raise WarehouseError(f"cannot open {self.describe()}: {message}") from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self.is_embedded:
                        raise WarehouseBusyError(
                            f"{self.describe()} stayed locked by another process for {self.lock_timeout_s:.0f}s "
                            f"({attempts} attempts). Stop the other process (a Dagster run, the live runner) "
                            f"or raise lock_timeout_s."
                        ) from exc
                    raise WarehouseError(f"cannot reach {self.describe()} after {attempts} attempts: {message}") from exc
                time.sleep(min(delay * (0.5 + random.random()), remaining))
                delay = min(delay * 2, 2.0)

    @contextmanager
    def _client(self) -> Iterator[Client]:
        with _process_lock if self.is_embedded else nullcontext():
            client = self._open_with_retry()
            try:
                yield client
            finally:
                client.close()

    @contextmanager
    def connect(self) -> Iterator[Client]:
        """A raw client for a short unit of work; migrations are applied on first use per process."""
        with self._client() as client:
            key = self.describe()
            if key not in _migrated:
                applied = apply_migrations(client, self.database)
                if applied:
                    log.info("applied warehouse migrations %s to %s", applied, key)
                _migrated.add(key)
            client.database = self.database
            yield client

    @contextmanager
    def session(self) -> Iterator[WarehouseSession]:
        """Several operations on one client. Opening the embedded engine costs ~0.1-0.2 s
        and holds its directory, so group the work of a step, and keep slow non-database
        work (vendor calls, heavy computation) outside the session."""
        with self.connect() as client:
            yield WarehouseSession(client)

    def migrate(self) -> list[int]:
        """Apply pending migrations now; returns the versions applied (empty when current)."""
        with self._client() as client:
            applied = apply_migrations(client, self.database)
            _migrated.add(self.describe())
            return applied

    # One-shot conveniences: each opens its own session.
    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        with self.session() as session:
            session.command(sql, parameters)

    def query_frame(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pl.DataFrame:
        with self.session() as session:
            return session.query_frame(sql, parameters)

    def insert_frame(self, table: str, frame: pl.DataFrame) -> int:
        with self.session() as session:
            return session.insert_frame(table, frame)

    def replace(self, table: str, where: str, parameters: Mapping[str, Any], frame: pl.DataFrame) -> int:
        with self.session() as session:
            return session.replace(table, where, parameters, frame)


class WarehouseSession:
    """Operations on one open client (see :meth:`WarehouseResource.session`)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        self.client.command(sql, parameters=parameters)

    def query_frame(self, sql: str, parameters: Mapping[str, Any] | None = None) -> pl.DataFrame:
        return pl.from_arrow(self.client.query_arrow(sql, parameters=parameters))  # type: ignore[return-value]

    def insert_frame(self, table: str, frame: pl.DataFrame) -> int:
        if frame.height:
            self.client.insert_arrow(table, frame.to_arrow())
        return frame.height

    def replace(self, table: str, where: str, parameters: Mapping[str, Any], frame: pl.DataFrame) -> int:
        """Delete the rows matching ``where``, then insert ``frame``: how a re-materialized
        partition replaces its rows instead of duplicating them. The delete is skipped when
        nothing matches (a first load), which the primary key answers cheaply."""
        matching = self.client.query(f"SELECT count() FROM {table} WHERE {where}", parameters=parameters)
        if matching.result_rows[0][0]:
            self.client.command(f"DELETE FROM {table} WHERE {where}", parameters=parameters)
        return self.insert_frame(table, frame)


Warehouse = WarehouseResource | WarehouseSession
"""Either works wherever a function only runs queries: a session, or the resource (one session per call)."""


def warehouse_from_env() -> WarehouseResource:
    """The warehouse as the environment configures it; values stay ``EnvVar`` references,
    so Dagster resolves them at run time and never shows a secret in the UI.

    ``CLICKHOUSE_URL``, or ``CLICKHOUSE_HOST`` with ``CLICKHOUSE_PORT``, ``CLICKHOUSE_USER``,
    ``CLICKHOUSE_PASSWORD``, ``CLICKHOUSE_SECURE``; ``CLICKHOUSE_DATABASE`` for either;
    otherwise the embedded engine under ``TRADEFORGE_WAREHOUSE_PATH`` or
    ``$TRADEFORGE_HOME/warehouse``.
    """
    env = os.environ
    config: dict[str, Any] = {}
    for field, name in (
        ("url", "CLICKHOUSE_URL"),
        ("host", "CLICKHOUSE_HOST"),
        ("username", "CLICKHOUSE_USER"),
        ("password", "CLICKHOUSE_PASSWORD"),
        ("database", "CLICKHOUSE_DATABASE"),
        ("embedded_path", "TRADEFORGE_WAREHOUSE_PATH"),
    ):
        if env.get(name):
            config[field] = EnvVar(name)
    if env.get("CLICKHOUSE_PORT"):
        config["port"] = EnvVar.int("CLICKHOUSE_PORT")
    if env.get("CLICKHOUSE_SECURE"):
        config["secure"] = env["CLICKHOUSE_SECURE"].strip().lower() in ("1", "true", "yes")
    if "embedded_path" not in config and not (env.get("CLICKHOUSE_URL") or env.get("CLICKHOUSE_HOST")):
        config["embedded_path"] = str(default_home() / "warehouse")
    return WarehouseResource(**config)
