"""The warehouse connection without Dagster: ClickHouse through clickhouse-connect, a server or
the embedded chDB engine.

One client library and one SQL dialect in both settings. The embedded engine (chDB) lets one
process at a time hold a data directory, so every operation here opens a short-lived
client, and opening retries with backoff while another process holds the directory, up to
``lock_timeout_s``, then fails with :class:`WarehouseBusyError` naming the path.

:class:`WarehouseClient` is the plain client (the live runner reads its warm-up history with
it, and ``live/`` never imports Dagster); :class:`~resources.warehouse.client.WarehouseResource`
is the same connection as a Dagster resource. Both take their methods from
:class:`WarehouseConnection`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clickhouse_connect
import polars as pl
from clickhouse_connect.driver.client import Client

from resources.warehouse.commits import COMMITS_TABLE, new_batch
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


class WarehouseConnection:
    """The connection's behaviour; subclasses declare the settings (``url``, ``host``, ``port``,
    ``username``, ``password``, ``database``, ``secure``, ``embedded_path``, ``lock_timeout_s``)."""

    url: str | None
    host: str | None
    port: int | None
    username: str
    password: str
    database: str
    secure: bool
    embedded_path: str | None
    lock_timeout_s: float

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

    def replace(self, *writes: TableWrite, cleanup: bool = True) -> int:
        with self.session() as session:
            return session.replace(*writes, cleanup=cleanup)


@dataclass(frozen=True)
class WarehouseClient(WarehouseConnection):
    """The warehouse as a plain object (no Dagster): set ``url`` or ``host`` for a server;
    leave both unset for the embedded engine under ``embedded_path``."""

    url: str | None = None
    host: str | None = None
    port: int | None = None
    username: str = "default"
    password: str = field(default="", repr=False)
    database: str = "tradeforge"
    secure: bool = False
    embedded_path: str | None = None
    lock_timeout_s: float = 120.0

    @classmethod
    def from_env(cls) -> WarehouseClient:
        """The warehouse the environment configures (see :func:`resources.warehouse.client.warehouse_from_env`)."""
        env = os.environ
        config: dict[str, Any] = {}
        for name, variable in (("url", "CLICKHOUSE_URL"), ("host", "CLICKHOUSE_HOST"), ("username", "CLICKHOUSE_USER"),
                               ("password", "CLICKHOUSE_PASSWORD"), ("database", "CLICKHOUSE_DATABASE"),
                               ("embedded_path", "TRADEFORGE_WAREHOUSE_PATH")):
            if env.get(variable):
                config[name] = env[variable]
        if env.get("CLICKHOUSE_PORT"):
            config["port"] = int(env["CLICKHOUSE_PORT"])
        if env.get("CLICKHOUSE_SECURE"):
            config["secure"] = env["CLICKHOUSE_SECURE"].strip().lower() in ("1", "true", "yes")
        return cls(**config)


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

    def replace(self, *writes: TableWrite, cleanup: bool = True) -> int:
        """Replace the partition scopes of every write, all or nothing (see
        :mod:`resources.warehouse.commits`): insert the rows under a new batch, check that
        each landed in a scope it replaces, commit every scope of every write in one INSERT,
        then delete the superseded rows (only where some exist: a first load deletes
        nothing). Returns the batch committed.

        A range run replacing many chunks passes ``cleanup=False`` and calls
        :meth:`remove_superseded` once at the end: a DELETE costs about as much for a day as
        for a year of the same parts, so one per run instead of one per chunk."""
        if not writes:
            return 0
        pairs = [(w.table, scope) for w in writes for scope in w.scopes]
        newest = self.client.query(
            f"SELECT max(batch) FROM {COMMITS_TABLE} WHERE (table_name, scope) IN {{pairs:Array(Tuple(String, String))}}",
            parameters={"pairs": pairs},
        ).result_rows
        batch = new_batch(int(newest[0][0] or 0) if newest else 0)
        for write in writes:
            if write.frame.height:
                self.insert_frame(write.table, write.frame.with_columns(pl.lit(batch, dtype=pl.UInt64).alias("_batch")))
        for write in writes:  # a row outside its write's scopes would never become visible: refuse before committing
            landed = self.client.query(
                f"SELECT count(), countIf(_scope NOT IN {{scopes:Array(String)}}) FROM {write.table} "
                f"WHERE _batch = {{batch:UInt64}} AND ({write.where})",
                parameters={**write.parameters, "scopes": list(write.scopes), "batch": batch},
            ).result_rows[0]
            if landed[0] != write.frame.height or landed[1]:
                raise WarehouseError(
                    f"{write.table}: {write.frame.height} rows written but {landed[0]} found in the write's range and "
                    f"{landed[1]} outside its partitions {list(write.scopes)[:3]}...; nothing was committed"
                )
        self.client.insert(COMMITS_TABLE, [[table, scope, batch] for table, scope in pairs],
                           column_names=["table_name", "scope", "batch"])
        if cleanup:
            self.remove_superseded(*writes, before=batch)
        return batch

    def remove_superseded(self, *writes: TableWrite, before: int) -> None:
        """Delete the rows of the writes' scopes stored by batches older than ``before`` (the
        first batch a run committed for them): superseded rows and left-overs of crashed
        writes. Invisible already; this only frees their space. Skipped where none exist."""
        for write in writes:
            stale = f"({write.where}) AND _scope IN {{scopes:Array(String)}} AND _batch < {{batch:UInt64}}"
            params = {**write.parameters, "scopes": list(write.scopes), "batch": before}
            if self.client.query(f"SELECT count() FROM {write.table} WHERE {stale}", parameters=params).result_rows[0][0]:
                self.client.command(f"DELETE FROM {write.table} WHERE {stale}", parameters=params)


@dataclass(frozen=True)
class TableWrite:
    """Rows replacing the partition ``scopes`` of ``table``. ``where`` (with ``parameters``)
    bounds those partitions by the table's key columns, so finding the superseded rows reads
    only them; it may be wider than the scopes, never narrower."""

    table: str
    where: str
    parameters: Mapping[str, Any]
    frame: pl.DataFrame
    scopes: Sequence[str]


Warehouse = WarehouseConnection | WarehouseSession
"""Either works wherever a function only runs queries: a session, or a connection (one session per call)."""
