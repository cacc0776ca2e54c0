"""Shared fixtures: the embedded warehouse (real chDB), a real Postgres server, helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from resources.warehouse import WarehouseResource
from tests.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def warehouse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One chDB data directory for the session: chDB serves one directory per process, and
    re-initialising the engine for every test would only cost time."""
    return tmp_path_factory.mktemp("warehouse")


@pytest.fixture
def warehouse(warehouse_dir: Path) -> WarehouseResource:
    """A fresh database in the session's embedded warehouse, so tests never share rows."""
    return WarehouseResource(
        embedded_path=str(warehouse_dir), database=f"t_{uuid.uuid4().hex[:12]}", lock_timeout_s=60
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def subprocess_env(warehouse_dir: Path) -> dict[str, str]:
    """Environment for child processes: this checkout importable, no stray configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "DAGSTER_PG_", "TRADEFORGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="session", autouse=True)
def yfinance_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """yfinance keeps Yahoo's cookie and each ticker's time zone in a cache on disk (by default
    the user's): the stubs' cookie must never land there, so the session gets its own."""
    import yfinance

    folder = tmp_path_factory.mktemp("yfinance")
    yfinance.set_tz_cache_location(str(folder))
    return folder
