"""Reads and idempotent writes of backtests: ``backtest_runs``, ``backtest_trades``,
``backtest_equity``. A run replaces every row of its ``run_id`` in the three tables, all or
nothing (one commit for the three; see :mod:`resources.warehouse.commits`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from models.backtest.runner import BacktestResult
from models.market.instruments import instrument
from models.market.timeframes import Timeframe
from models.trading.currency import ConvMode, conversion_mode, cross_pair
from resources.warehouse.client import TableWrite, Warehouse, WarehouseResource, default_home
from resources.warehouse.commits import visible
from resources.warehouse.features import bars_around
from resources.warehouse.market import read_bars

_TRADE_COLUMNS = ["trade_id", "symbol", "side", "qty", "entry_ts", "entry_price", "exit_ts", "exit_price", "pnl",
                  "gross_pnl", "commission", "return_pct", "r_multiple", "exit_reason"]
_RUN = "run_id = {run_id:String}"


def _num(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else float("nan")


def write_backtest(warehouse: Warehouse, run_id: str, result: BacktestResult, *, name: str, params: dict, config: dict,
                   tearsheet: str, source: str, model_name: str = "", model_version: int | None = None,
                   mlflow_run_id: str = "") -> None:
    """``model_name``/``model_version``: the registered model a model backtest judged."""
    m = result.metrics
    eq = result.equity
    run = pl.DataFrame([{
        "run_id": run_id, "name": name, "strategy": result.strategy, "params": json.dumps(params, sort_keys=True, default=str),
        "symbols": result.symbols, "timeframe": result.timeframe, "start": eq["ts"][0], "end": eq["ts"][-1],
        "bars": eq.height, "config": json.dumps(config, sort_keys=True, default=str),
        "initial_equity": result.config.initial_equity, "final_equity": _num(m["final_equity"]),
        **{k: _num(m[k]) for k in ("total_return", "annual_return", "sharpe", "sortino", "calmar", "max_drawdown",
                                   "win_rate", "profit_factor", "exposure")},
        "trades": int(m["trades"]), "costs": _num(m["commission"] + m["spread_slippage"]),
        "buy_hold_return": m.get("buy_hold_return"), "metrics": json.dumps(m, default=str), "tearsheet": tearsheet,
        "source": source, "model_name": model_name, "model_version": model_version, "mlflow_run_id": mlflow_run_id,
    }], schema_overrides={"model_version": pl.UInt32}).with_columns(pl.col("start", "end").dt.cast_time_unit("ms").dt.truncate("1s"))
    trades = result.trades.select(_TRADE_COLUMNS).with_columns(pl.lit(run_id).alias("run_id"), pl.col("trade_id").cast(pl.UInt32))
    equity = eq.select("ts", "equity", "drawdown", "exposure", "margin",
                       pl.col("buy_hold") if "buy_hold" in eq.columns else pl.lit(None, pl.Float64).alias("buy_hold"))
    params_ = {"run_id": run_id}
    warehouse.replace(
        TableWrite("backtest_trades", _RUN, params_, trades.select("run_id", *_TRADE_COLUMNS), [run_id]),
        TableWrite("backtest_equity", _RUN, params_, equity.select(pl.lit(run_id).alias("run_id"), pl.all()), [run_id]),
        TableWrite("backtest_runs", _RUN, params_, run, [run_id]),
    )


def read_runs(warehouse: Warehouse, name: str | None = None) -> pl.DataFrame:
    where = f"WHERE {visible('backtest_runs')}" + (" AND name = {name:String}" if name else "")
    return warehouse.query_frame(f"SELECT * EXCEPT (created_at, _scope, _batch) FROM backtest_runs {where} ORDER BY run_id",
                                 {"name": name} if name else {})


def read_trades(warehouse: Warehouse, run_id: str) -> pl.DataFrame:
    return warehouse.query_frame(f"SELECT {', '.join(_TRADE_COLUMNS)} FROM backtest_trades WHERE {_RUN} "
                                 f"AND {visible('backtest_trades')} ORDER BY trade_id",
                                 {"run_id": run_id})


def read_equity(warehouse: Warehouse, run_id: str) -> pl.DataFrame:
    return warehouse.query_frame(f"SELECT ts, equity, drawdown, exposure, margin, buy_hold FROM backtest_equity WHERE {_RUN} "
                                 f"AND {visible('backtest_equity')} ORDER BY ts",
                                 {"run_id": run_id})


def tearsheet_dir() -> Path:
    return default_home() / "backtests"


def load_bars(warehouse: WarehouseResource, symbols: Sequence[str], timeframe: Timeframe, start: datetime, end: datetime,
              warmup: int, account_currency: str, say: Callable[[str], None] = lambda _: None,
              ) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Bars of ``symbols`` opening in ``[start, end)`` with ``warmup`` bars before, and the bars
    of the pairs that convert cross pairs' PnL. One clear error when something is missing."""
    frames, rates = [], {}
    with warehouse.session() as session:
        for symbol in symbols:
            bars, history = bars_around(session, symbol, timeframe, start, end, warmup)
            if bars.height == history:
                raise ValueError(f"no {timeframe.value} bars of {symbol} in {start:%Y-%m-%d} .. {end:%Y-%m-%d} "
                                 f"in the warehouse: ingest them first (tradeforge demo, or the ingest_market_data job)")
            frames.append(bars)
            say(f"  {symbol}: {bars.height - history:,} bars (+{history} warm-up)")
            spec_ = instrument(symbol)
            if conversion_mode(spec_, account_currency) is ConvMode.CROSS:
                pair, _ = cross_pair(spec_.quote_currency, account_currency)
                rates[pair] = read_bars(session, pair, timeframe, None, end)
                if rates[pair].is_empty():
                    raise ValueError(f"{symbol} in a {account_currency} account needs {pair} {timeframe.value} bars "
                                     f"to convert its PnL: ingest {pair} too")
    return pl.concat(frames), rates
