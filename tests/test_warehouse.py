"""The warehouse on the real ClickHouse engine (embedded chDB through clickhouse-connect)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from models.market.candles import aggregate_ticks
from models.market.quality import validate_ticks
from models.market.synthetic import generate_ticks
from resources.warehouse import WarehouseBusyError, WarehouseResource
from resources.warehouse.migrations import MIGRATIONS, applied_versions
from resources.warehouse.market import read_bars, read_ticks, write_bars, write_ticks

DAY = date(2024, 3, 6)
START = datetime(2024, 3, 6, tzinfo=UTC)
END = START + timedelta(days=1)


def test_migrations_apply_once_and_are_safe_to_repeat(warehouse: WarehouseResource):
    assert warehouse.migrate() == [m.version for m in MIGRATIONS]
    assert warehouse.migrate() == []
    with warehouse.connect() as client:
        assert applied_versions(client) == [m.version for m in MIGRATIONS]
        tables = {row[0] for row in client.query("SHOW TABLES").result_rows}
        # Re-running every statement of an applied migration changes nothing.
        for migration in MIGRATIONS:
            for statement in migration.statements:
                statement(client) if callable(statement) else client.command(statement)
    assert {"market_ticks", "market_ticks_quarantine", "aggregates", "ml_features", "schema_migrations"} <= tables


def quarantined(checked) -> pl.DataFrame:
    return checked.quarantine.with_columns(pl.lit(DAY).alias("day"))


def test_ticks_round_trip_exactly(warehouse: WarehouseResource):
    checked = validate_ticks(generate_ticks("EURUSD", DAY), "EURUSD", START, END)
    write_ticks(warehouse, "EURUSD", [DAY], checked.clean, quarantined(checked))
    back = read_ticks(warehouse, "EURUSD", START, END)
    assert back.equals(checked.clean.select(back.columns))
    assert back["ts"].dtype == pl.Datetime("ms", "UTC")


def test_rewriting_a_partition_replaces_it(warehouse: WarehouseResource):
    checked = validate_ticks(generate_ticks("EURUSD", DAY), "EURUSD", START, END)
    neighbour = START + timedelta(days=1)
    nxt = validate_ticks(generate_ticks("EURUSD", DAY + timedelta(days=1)), "EURUSD", neighbour, neighbour + timedelta(days=1))
    write_ticks(warehouse, "EURUSD", [DAY + timedelta(days=1)], nxt.clean, nxt.quarantine.with_columns(pl.lit(DAY).alias("day")))
    for _ in range(2):
        write_ticks(warehouse, "EURUSD", [DAY], checked.clean, quarantined(checked))
    assert read_ticks(warehouse, "EURUSD", START, END).height == checked.clean.height
    # A smaller rewrite leaves nothing of the larger one behind, and the next day untouched.
    write_ticks(warehouse, "EURUSD", [DAY], checked.clean.head(100), quarantined(checked))
    assert read_ticks(warehouse, "EURUSD", START, END).height == 100
    assert read_ticks(warehouse, "EURUSD", neighbour, neighbour + timedelta(days=1)).height == nxt.clean.height


def test_bars_round_trip(warehouse: WarehouseResource):
    ticks = generate_ticks("XAUUSD", DAY)
    bars = aggregate_ticks(ticks)
    write_bars(warehouse, "XAUUSD", [DAY], bars.filter(pl.col("timeframe") != "W1").with_columns(
        pl.lit(END).cast(pl.Datetime("ms", "UTC")).alias("covered_until")))
    back = read_bars(warehouse, "XAUUSD")
    expected = bars.filter(pl.col("timeframe") != "W1").sort("symbol", "timeframe", "ts")
    assert back.drop("covered_until").equals(expected)
    assert set(back["covered_until"]) == {END}


def _worker(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.warehouse_worker", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_write_concurrently_without_loss(warehouse: WarehouseResource, subprocess_env):
    """chDB locks its directory per process: two writers take turns and lose nothing."""
    warehouse.migrate()
    path, db = str(warehouse.embedded_dir), warehouse.database
    writers = [_worker("write", path, db, symbol, "2024-03-04", "4", env=subprocess_env) for symbol in ("EURUSD", "BTCUSD")]
    outputs = [w.communicate(timeout=300) for w in writers]
    for writer, (out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
    expected = {
        symbol: sum(generate_ticks(symbol, date(2024, 3, 4) + timedelta(days=i)).height for i in range(4))
        for symbol in ("EURUSD", "BTCUSD")
    }
    stored = dict(warehouse.query_frame("SELECT symbol, count() AS n FROM market_ticks GROUP BY symbol").iter_rows())
    assert stored == expected
    assert expected["EURUSD"] > 200_000


def test_a_held_warehouse_fails_clearly_after_the_timeout(warehouse: WarehouseResource, subprocess_env):
    warehouse.migrate()
    holder = _worker("hold", str(warehouse.embedded_dir), warehouse.database, "6", env=subprocess_env)
    assert holder.stdout.readline().strip() == "holding"
    impatient = warehouse.model_copy(update={"lock_timeout_s": 1.0})
    with pytest.raises(WarehouseBusyError, match=str(warehouse.embedded_dir)) as failure:
        impatient.query_frame("SELECT 1 AS one")
    assert "stayed locked by another process" in str(failure.value)
    # A patient client gets through as soon as the holder lets go.
    assert warehouse.query_frame("SELECT 1 AS one")["one"][0] == 1
    holder.wait(timeout=30)
    assert holder.returncode == 0
