"""Backtests on the real engines: bars in the embedded ClickHouse, the `backtest` asset run by
Dagster (tables, metadata, checks, tearsheet), reruns that replace, and `tradeforge backtest`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from assets.backtests import backtest, load_specs
from models.market.candles import BAR_SCHEMA
from models.market.timeframes import Timeframe
from orchestration.cli import main
from resources.warehouse.backtests import read_equity, read_runs, read_trades
from resources.warehouse.market import write_bars

SPEC = "sma_cross_eurusd_m5"


def _m5_bars(symbol: str, start: datetime, days: int, price: float, seed: int) -> pl.DataFrame:
    n = days * 288
    rng = np.random.default_rng(seed)
    close = price * np.exp(np.cumsum(rng.normal(0, 0.0008, n)))
    open_ = np.r_[price, close[:-1]]
    wick = np.abs(rng.normal(0, 0.0004, n))
    ts = pl.Series(int(start.timestamp() * 1000) + np.arange(n) * 300_000).cast(pl.Datetime("ms", "UTC"))
    frame = pl.DataFrame({
        "symbol": symbol, "timeframe": "M5", "ts": ts, "open": open_, "high": np.maximum(open_, close) * (1 + wick),
        "low": np.minimum(open_, close) * (1 - wick), "close": close, "bid_close": close - 0.00004, "ask_close": close + 0.00004,
        "volume": 0.0, "tick_count": 100, "quote_count": 100, "spread_mean": 0.00008, "spread_max": 0.0002,
        "vwap": close, "source": "test",
    })
    return frame.cast(BAR_SCHEMA)  # type: ignore[arg-type]


@pytest.fixture
def loaded(warehouse, tmp_path, monkeypatch):
    monkeypatch.setenv("TRADEFORGE_HOME", str(tmp_path / "home"))
    start = datetime(2024, 3, 4, tzinfo=UTC)
    bars = _m5_bars("EURUSD", start, 10, 1.09, seed=1)
    days = [start.date() + timedelta(days=i) for i in range(10)]
    filed = bars.with_columns((pl.col("ts").dt.truncate("1d") + timedelta(days=1)).alias("covered_until"))
    write_bars(warehouse, "EURUSD", days, filed)
    return warehouse


def _materialize(warehouse):
    return materialize([backtest], partition_key=SPEC, resources={"warehouse": warehouse},
                       instance=DagsterInstance.ephemeral(), raise_on_error=False)


def test_backtest_asset_stores_the_run_and_reruns_replace_it(loaded):
    warehouse = loaded
    first = _materialize(warehouse)
    assert first.success
    assert all(c.passed for c in first.get_asset_check_evaluations()) and len(first.get_asset_check_evaluations()) == 2
    meta = first.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    run_id = meta["run_id"].value
    runs = read_runs(warehouse)
    assert runs.height == 1 and runs["run_id"][0] == run_id == load_specs()[SPEC].run_id
    run = runs.row(0, named=True)
    assert run["trades"] == meta["trades"].value > 5
    assert run["sharpe"] == pytest.approx(meta["sharpe"].value) and run["source"] == "dagster"
    trades, equity = read_trades(warehouse, run_id), read_equity(warehouse, run_id)
    assert trades.filter(pl.col("exit_ts").is_not_null()).height == run["trades"]
    # equity per bar of the spec's window only (the warm-up bars before it do not count)
    assert equity.height == 9 * 288 == meta["dagster/row_count"].value
    assert equity["equity"][-1] == pytest.approx(run["final_equity"])
    closed = trades.filter(pl.col("exit_ts").is_not_null())["pnl"].sum()
    assert run["final_equity"] - run["initial_equity"] == pytest.approx(closed, abs=abs(closed) + 2000)  # + the open trade
    assert len(meta["equity_curve"].value["equity"]) > 100
    page = open(meta["tearsheet"].value).read()
    assert "Monthly returns" in page and SPEC in page

    second = _materialize(warehouse)  # deterministic, and a rerun replaces its rows
    assert second.success
    again = read_runs(warehouse)
    assert again.height == 1 and again["final_equity"][0] == run["final_equity"]
    assert read_trades(warehouse, run_id).equals(trades) and read_equity(warehouse, run_id).height == equity.height


def test_the_command_prints_the_summary_and_stores_the_run(loaded, monkeypatch, capsys):
    warehouse = loaded
    monkeypatch.setenv("TRADEFORGE_WAREHOUSE_PATH", warehouse.embedded_path)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", warehouse.database)
    code = main(["backtest", "--strategy", "sma_cross", "--symbols", "eurusd", "--start", "2024-03-05", "--end", "2024-03-12",
                 "--param", "fast=8", "--param", "slow=40", "--risk", "risk_fraction=0.002"])
    out = capsys.readouterr()
    assert code == 0, out.err
    for line in ("sma_cross(fast=8, slow=40) on EURUSD M5", "engine: ", "100%", "Sharpe", "max drawdown", "profit factor", "tearsheet:"):
        assert line in out.out
    runs = read_runs(warehouse)
    assert runs["source"].to_list() == ["cli"] and runs["name"][0] == "sma_cross"

    for argv, message in (
        (["backtest", "--strategy", "nope", "--symbols", "EURUSD", "--start", "2024-03-05", "--end", "2024-03-06"], "no strategy or spec 'nope'"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD", "--start", "2025-01-01", "--end", "2025-01-03"], "no M5 bars of EURUSD"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD", "--start", "2024-03-05", "--end", "2024-03-06",
          "--param", "fast=50"], "fast < slow"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD", "--start", "2024-03-05", "--end", "2024-03-06",
          "--risk", "max_leverage=3"], "unknown risk settings"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD", "--start", "2024-03-05", "--end", "2024-03-06",
          "--risk", "risk_fraction=lots"], "risk setting risk_fraction='lots' is not a valid float"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD", "--start", "2024-03-05", "--end", "2024-03-06",
          "--risk", "max_drawdown=20"], "between 0 and 1"),
        (["backtest", "--strategy", "sma_cross", "--symbols", "EURUSD"], "--start is required"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
