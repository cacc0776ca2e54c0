"""Reads and idempotent writes of market data: ticks, their quarantine, and candles."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime

import polars as pl

from models.market.candles import BAR_SCHEMA
from models.market.ticks import TICK_SCHEMA, TS
from models.market.timeframes import Timeframe
from resources.warehouse.client import Warehouse

TICK_COLUMNS = ["symbol", "ts", "seq", "bid", "ask", "bid_size", "ask_size", "price", "size", "source"]
_QUARANTINE_COLUMNS = ["symbol", "day", "raw_symbol", "ts", "bid", "ask", "bid_size", "ask_size", "price", "size", "source", "reason"]
_WINDOW = "symbol = {symbol:String} AND ts >= {start:DateTime64(3, 'UTC')} AND ts < {end:DateTime64(3, 'UTC')}"


def write_ticks(
    warehouse: Warehouse,
    symbol: str,
    start: datetime,
    end: datetime,
    clean: pl.DataFrame,
    quarantine: pl.DataFrame,
) -> None:
    """Replace the ticks of ``symbol`` in ``[start, end)`` and that window's quarantine."""
    params = {"symbol": symbol, "start": start, "end": end, "day": start.date()}
    warehouse.replace("market_ticks", _WINDOW, params, clean.select(TICK_COLUMNS))
    rejected = quarantine.select(
        pl.lit(symbol).alias("symbol"),
        pl.lit(start.date()).alias("day"),
        pl.col("symbol").alias("raw_symbol"),
        *_QUARANTINE_COLUMNS[3:],
    )
    warehouse.replace("market_ticks_quarantine", "symbol = {symbol:String} AND day = {day:Date}", params, rejected)


def read_ticks(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Ticks of ``symbol`` in ``[start, end)`` in stored order (ts, seq)."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(TICK_COLUMNS)} FROM market_ticks WHERE {_WINDOW} ORDER BY ts, seq",
        {"symbol": symbol, "start": start, "end": end},
    )
    if frame.is_empty():
        return pl.DataFrame(schema={**TICK_SCHEMA, "seq": pl.UInt32()}).select(TICK_COLUMNS)
    return frame.with_columns(pl.col("ts").cast(TS), pl.col("symbol").cast(pl.String), pl.col("source").cast(pl.String))


def read_quarantine(warehouse: Warehouse, symbol: str, day: date) -> pl.DataFrame:
    return warehouse.query_frame(
        f"SELECT {', '.join(_QUARANTINE_COLUMNS)} FROM market_ticks_quarantine "
        "WHERE symbol = {symbol:String} AND day = {day:Date}",
        {"symbol": symbol, "day": day},
    )


def write_bars(
    warehouse: Warehouse,
    symbol: str,
    bars: pl.DataFrame,
    start: datetime,
    end: datetime,
    carried: Mapping[Timeframe, datetime],
) -> None:
    """Write the bars that overlap ``[start, end)``, stamped ``covered_until = end``.

    Replaces what this window wrote before, and partial versions of the carried bars written
    by earlier windows; a more complete version written by a later window stays and wins
    (the table keeps the row with the greatest ``covered_until``).
    """
    where = "symbol = {symbol:String} AND covered_until <= {end:DateTime('UTC')} AND (ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}"
    params: dict[str, object] = {"symbol": symbol, "start": start, "end": end}
    if carried:
        where += " OR (timeframe, ts) IN {carried:Array(Tuple(String, DateTime('UTC')))}"
        params["carried"] = [(tf.value, opened) for tf, opened in carried.items()]
    where += ")"
    rows = bars.select(*BAR_SCHEMA, pl.lit(end).cast(TS).alias("covered_until"))
    warehouse.replace("aggregates", where, params, rows)


def duplicate_bar_rows(warehouse: Warehouse, symbol: str, covered_until: datetime) -> int:
    """Rows written by one window beyond one per bar: non-zero only if a replace went wrong."""
    frame = warehouse.query_frame(
        "SELECT count() - uniqExact(timeframe, ts) AS extra FROM aggregates "
        "WHERE symbol = {symbol:String} AND covered_until = {until:DateTime('UTC')}",
        {"symbol": symbol, "until": covered_until},
    )
    return int(frame["extra"][0])


def read_bars(
    warehouse: Warehouse,
    symbol: str | None = None,
    timeframe: Timeframe | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.DataFrame:
    """Final bars (the most complete version of each), ordered by symbol, timeframe, ts."""
    clauses, params = [], {}
    for column, value, kind in (("symbol", symbol, "String"), ("timeframe", timeframe and timeframe.value, "String")):
        if value is not None:
            clauses.append(f"{column} = {{{column}:{kind}}}")
            params[column] = value
    if start is not None:
        clauses.append("ts >= {start:DateTime('UTC')}")
        params["start"] = start
    if end is not None:
        clauses.append("ts < {end:DateTime('UTC')}")
        params["end"] = end
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(BAR_SCHEMA)}, covered_until FROM aggregates FINAL {where} ORDER BY symbol, timeframe, ts",
        params,
    )
    schema = {**BAR_SCHEMA, "covered_until": TS}
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    return seconds_to_datetime(frame, "ts", "covered_until").cast(schema)  # type: ignore[arg-type]


def seconds_to_datetime(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """ClickHouse ``DateTime`` columns arrive as epoch seconds over Arrow: make them UTC datetimes."""
    return frame.with_columns(
        pl.from_epoch(pl.col(c).cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC").cast(TS) for c in columns
    )


_CANDLE_COLUMNS = ["symbol", "ts", "open", "high", "low", "close", "volume", "vwap", "tick_count", "source"]
_CANDLE_WINDOW = "symbol = {symbol:String} AND ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}"


_CANDLE_QUARANTINE_COLUMNS = ["symbol", "day", *_CANDLE_COLUMNS[1:], "reason"]


def write_vendor_candles(
    warehouse: Warehouse, symbol: str, start: datetime, end: datetime, candles: pl.DataFrame, quarantine: pl.DataFrame
) -> None:
    """Replace the vendor candles of ``symbol`` opening in ``[start, end)`` and that day's quarantine."""
    params = {"symbol": symbol, "start": start, "end": end, "day": start.date()}
    rows = candles.with_columns(pl.lit(symbol).alias("symbol")).select(_CANDLE_COLUMNS)
    warehouse.replace("vendor_candles", _CANDLE_WINDOW, params, rows)
    rejected = quarantine.with_columns(pl.lit(symbol).alias("symbol"), pl.lit(start.date()).alias("day"))
    warehouse.replace("vendor_candles_quarantine", "symbol = {symbol:String} AND day = {day:Date}", params,
                      rejected.select(_CANDLE_QUARANTINE_COLUMNS))


def read_candle_quarantine(warehouse: Warehouse, symbol: str, day: date) -> pl.DataFrame:
    return warehouse.query_frame(
        f"SELECT {', '.join(_CANDLE_QUARANTINE_COLUMNS)} FROM vendor_candles_quarantine "
        "WHERE symbol = {symbol:String} AND day = {day:Date} ORDER BY ts",
        {"symbol": symbol, "day": day},
    )


def read_vendor_candles(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Vendor candles of ``symbol`` opening in ``[start, end)``, by time."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(_CANDLE_COLUMNS)} FROM vendor_candles WHERE {_CANDLE_WINDOW} ORDER BY ts",
        {"symbol": symbol, "start": start, "end": end},
    )
    schema = {"symbol": pl.String(), "ts": TS, "open": pl.Float64(), "high": pl.Float64(), "low": pl.Float64(),
              "close": pl.Float64(), "volume": pl.Float64(), "vwap": pl.Float64(), "tick_count": pl.UInt32(), "source": pl.String()}
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    return seconds_to_datetime(frame, "ts").cast(schema)  # type: ignore[arg-type]
