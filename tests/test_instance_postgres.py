"""Dagster's own storage on a real PostgreSQL server that the test starts and stops."""

from __future__ import annotations

from datetime import date

import psycopg2
import pytest
from dagster import DagsterInstance, materialize

from assets.market_data import aggregates, market_ticks
from assets.partitions import SYMBOLS, DaySymbol
from orchestration.instance import ensure_dagster_home
from resources.conventions import MarketConventionsResource
from resources.market_data import MarketDataResource, SyntheticMarketResource


@pytest.fixture
def postgres_home(postgres, tmp_path, monkeypatch):
    for name, value in postgres.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return ensure_dagster_home()


def test_runs_events_and_partitions_are_stored_in_postgres(postgres, postgres_home, warehouse):
    config = (postgres_home / "dagster.yaml").read_text()
    assert "postgres_db" in config and postgres.password not in config  # credentials stay in the environment
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        instance.add_dynamic_partitions(SYMBOLS.name, ["EURUSD"])
        partition = DaySymbol("EURUSD", date(2024, 3, 6))
        result = materialize(
            [market_ticks, aggregates],
            partition_key=partition.key,
            instance=instance,
            resources={
                "warehouse": warehouse,
                "market_data": MarketDataResource(synthetic=SyntheticMarketResource(tick_rate_scale=0.1)),
                "conventions": MarketConventionsResource(),
            },
        )
        assert result.success
        run_id = result.run_id

    with psycopg2.connect(**postgres.connect_args()) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cursor.fetchone() == ("SUCCESS",)
        cursor.execute(
            "SELECT asset_key, partition FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'"
            " ORDER BY asset_key",
            (run_id,),
        )
        assert cursor.fetchall() == [('["aggregates"]', "2024-03-06|EURUSD"), ('["market_ticks"]', "2024-03-06|EURUSD")]
        cursor.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'symbols'")
        assert cursor.fetchall() == [("EURUSD",)]

    # A second instance on the same database sees what the first stored.
    with DagsterInstance.get() as again:
        assert again.get_run_by_id(run_id).is_success
        assert again.get_dynamic_partitions(SYMBOLS.name) == ["EURUSD"]


def test_partial_postgres_configuration_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
    for name in ("DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="missing DAGSTER_PG_DB, DAGSTER_PG_PASSWORD, DAGSTER_PG_USER"):
        ensure_dagster_home()


def test_sqlite_is_the_default(monkeypatch, tmp_path):
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    home = ensure_dagster_home()
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.event_log_storage).__name__ == "FastSqliteEventLogStorage"
    text = (home / "dagster.yaml").read_text()
    assert "\nstorage:" not in text and "postgres" not in text
