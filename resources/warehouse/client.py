"""The warehouse as a Dagster resource (:class:`WarehouseResource`); the connection itself, usable
without Dagster, is :mod:`resources.warehouse.connection`."""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from resources.warehouse.connection import (  # noqa: F401  (re-exported: the names this module always had)
    TableWrite,
    WarehouseBusyError,
    WarehouseClient,
    WarehouseConnection,
    WarehouseError,
    WarehouseSession,
    default_home,
)


class WarehouseResource(WarehouseConnection, ConfigurableResource):
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
