"""The user's broker data in the warehouse: ``broker_account``, ``broker_quotes`` (kept 24
hours), ``broker_trades``, and ``broker_quotes_m1`` (the quotes per minute, kept).

These are streams, written append-only; each table's key (see migrations 16-17) makes a row
that arrives twice (a redelivery from the bus, a rerun) replace itself, so reads use FINAL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl

from resources.brokers.mt5.sampler import ACCOUNT_SCHEMA, QUOTE_SCHEMA, TRADE_SCHEMA, BrokerDataSampler
from resources.warehouse.client import Warehouse

MINUTE_SCHEMA = {"server": pl.String(), "symbol": pl.String(), "ts": pl.Datetime("ms", "UTC"), "bid_close": pl.Float64(),
                 "ask_close": pl.Float64(), "mid_close": pl.Float64(), "spread_mean": pl.Float64(),
                 "spread_max": pl.Float64(), "quotes": pl.UInt32()}


def _write(warehouse: Warehouse, table: str, frame: pl.DataFrame, schema: dict) -> int:
    missing = set(schema) - set(frame.columns)
    if missing:
        raise ValueError(f"{table}: the frame lacks {sorted(missing)}")
    return warehouse.insert_frame(table, frame.select(list(schema)).cast(schema))  # type: ignore[arg-type]


def write_account(warehouse: Warehouse, frame: pl.DataFrame) -> int:
    return _write(warehouse, "broker_account", frame, ACCOUNT_SCHEMA)


def write_quotes(warehouse: Warehouse, frame: pl.DataFrame) -> int:
    return _write(warehouse, "broker_quotes", frame, QUOTE_SCHEMA)


def write_trades(warehouse: Warehouse, frame: pl.DataFrame) -> int:
    return _write(warehouse, "broker_trades", frame, TRADE_SCHEMA)


def write_quote_minutes(warehouse: Warehouse, frame: pl.DataFrame) -> int:
    return _write(warehouse, "broker_quotes_m1", frame.with_columns(pl.col("ts").dt.cast_time_unit("ms")), MINUTE_SCHEMA)


def store_sample(warehouse: Warehouse, sampler: BrokerDataSampler, since_ms: int | None = None) -> dict[str, int]:
    """Sample the account, the quotes and the deals once and store them (rows per table)."""
    account, quotes, deals = sampler.account(), sampler.quotes(), sampler.deals(since_ms)
    return {"broker_account": write_account(warehouse, account), "broker_quotes": write_quotes(warehouse, quotes),
            "broker_trades": write_trades(warehouse, deals)}


def _window(start: datetime | None, end: datetime | None, column: str = "ts") -> tuple[str, dict[str, Any]]:
    clauses, params = ["1"], {}
    if start is not None:
        clauses.append(f"{column} >= {{start:DateTime64(3, 'UTC')}}")
        params["start"] = start
    if end is not None:
        clauses.append(f"{column} < {{end:DateTime64(3, 'UTC')}}")
        params["end"] = end
    return " AND ".join(clauses), params


def _read(warehouse: Warehouse, table: str, schema: dict, order: str, start: datetime | None, end: datetime | None) -> pl.DataFrame:
    where, params = _window(start, end)
    frame = warehouse.query_frame(f"SELECT {', '.join(schema)} FROM {table} FINAL WHERE {where} ORDER BY {order}", params)
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    if table == "broker_quotes_m1":
        frame = frame.with_columns(pl.from_epoch(pl.col("ts").cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC"))
    return frame.cast(schema)  # type: ignore[arg-type]


def read_account(warehouse: Warehouse, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    return _read(warehouse, "broker_account", ACCOUNT_SCHEMA, "login, ts", start, end)


def read_quotes(warehouse: Warehouse, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    return _read(warehouse, "broker_quotes", QUOTE_SCHEMA, "server, symbol, ts", start, end)


def read_trades(warehouse: Warehouse, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    return _read(warehouse, "broker_trades", TRADE_SCHEMA, "ts, deal", start, end)


def read_quote_minutes(warehouse: Warehouse, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    return _read(warehouse, "broker_quotes_m1", MINUTE_SCHEMA, "server, symbol, ts", start, end)
