"""Reads and all-or-nothing writes of market data: ticks, vendor bars, their quarantines, candles.

Writes replace whole day partitions (one or a range of days of one symbol) through
:meth:`WarehouseSession.replace`; reads see committed partitions only (see
:mod:`resources.warehouse.commits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import polars as pl

from models.market.candles import BAR_SCHEMA
from models.market.ticks import TICK_SCHEMA, TS
from models.market.timeframes import Timeframe
from resources.warehouse.connection import TableWrite, Warehouse
from resources.warehouse.commits import PARTITIONED, visible

TICK_COLUMNS = ["symbol", "ts", "seq", "bid", "ask", "bid_size", "ask_size", "price", "size", "vendor_seq", "source"]
_QUARANTINE_COLUMNS = ["symbol", "day", "raw_symbol", "ts", "bid", "ask", "bid_size", "ask_size", "price", "size",
                       "vendor_seq", "source", "reason"]
_TS_WINDOW = "symbol = {symbol:String} AND ts >= {start:DateTime64(3, 'UTC')} AND ts < {end:DateTime64(3, 'UTC')}"
_DAY_WINDOW = "symbol = {symbol:String} AND day >= {first:Date} AND day <= {last:Date}"


def _day_window(symbol: str, days: Sequence[date]) -> dict[str, object]:
    first, last = min(days), max(days)
    return {"symbol": symbol, "first": first, "last": last,
            "start": _midnight(first), "end": _midnight(last) + timedelta(days=1)}


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _scopes(table: str, symbol: str, days: Sequence[date]) -> list[str]:
    return [PARTITIONED[table].scope(symbol, day) for day in days]


def ticks_writes(symbol: str, days: Sequence[date], clean: pl.DataFrame, quarantine: pl.DataFrame) -> list[TableWrite]:
    """The writes replacing the ticks of ``symbol`` on ``days`` and those days' quarantine
    (give both to one :meth:`replace`: they commit together)."""
    params = _day_window(symbol, days)
    rejected = quarantine.select(
        pl.lit(symbol).alias("symbol"),
        pl.col("day"),
        pl.col("symbol").alias("raw_symbol"),
        *(pl.col(c) if c in quarantine.columns else pl.lit(None, TICK_SCHEMA.get(c, pl.String())).alias(c)
          for c in _QUARANTINE_COLUMNS[3:]),
    )
    return [
        TableWrite("market_ticks", _TS_WINDOW, params, clean.select(TICK_COLUMNS), _scopes("market_ticks", symbol, days)),
        TableWrite("market_ticks_quarantine", _DAY_WINDOW, params, rejected,
                   _scopes("market_ticks_quarantine", symbol, days)),
    ]


def write_ticks(
    warehouse: Warehouse, symbol: str, days: Sequence[date], clean: pl.DataFrame, quarantine: pl.DataFrame
) -> None:
    """Replace the ticks of ``symbol`` on ``days`` (contiguous) and their quarantine, all or
    nothing. ``quarantine`` carries the ``day`` (partition) each rejected row is filed under."""
    warehouse.replace(*ticks_writes(symbol, days, clean, quarantine))


def read_ticks(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Ticks of ``symbol`` in ``[start, end)`` in stored order (ts, seq)."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(TICK_COLUMNS)} FROM market_ticks WHERE {_TS_WINDOW} AND {visible('market_ticks')} ORDER BY ts, seq",
        {"symbol": symbol, "start": start, "end": end},
    )
    if frame.is_empty():
        return pl.DataFrame(schema={**TICK_SCHEMA, "seq": pl.UInt32()}).select(TICK_COLUMNS)
    return frame.with_columns(pl.col("ts").cast(TS), pl.col("symbol").cast(pl.String), pl.col("source").cast(pl.String))


def read_quarantine(warehouse: Warehouse, symbol: str, day: date, last: date | None = None) -> pl.DataFrame:
    """Quarantined ticks filed under ``day`` (or ``day..last``)."""
    return warehouse.query_frame(
        f"SELECT {', '.join(_QUARANTINE_COLUMNS)} FROM market_ticks_quarantine "
        f"WHERE {_DAY_WINDOW} AND {visible('market_ticks_quarantine')} ORDER BY day, reason",
        {"symbol": symbol, "first": day, "last": last or day},
    )


def bar_writes(symbol: str, days: Sequence[date], bars: pl.DataFrame) -> TableWrite:
    """The write replacing what ``days`` (contiguous) hold of ``symbol``'s bars. Each row of
    ``bars`` carries ``covered_until``, the end of the last day of data in it: the day whose
    partition it belongs to. A multi-day bar (W1; H4/D1 under the New York boundary) has a
    version in each day it overlaps that was written; readers take the most complete."""
    params = _day_window(symbol, days)
    # covered_until in (start, end]; a bar opens at most 8 days before the day it is filed under
    where = ("symbol = {symbol:String} AND ts >= {lookback:DateTime('UTC')} AND ts < {end:DateTime('UTC')} "
             "AND covered_until > {start:DateTime('UTC')} AND covered_until <= {end:DateTime('UTC')}")
    params["lookback"] = params["start"] - timedelta(days=8)  # type: ignore[operator]
    rows = bars.select(*BAR_SCHEMA, pl.col("covered_until").cast(TS))
    return TableWrite("aggregates", where, params, rows, _scopes("aggregates", symbol, days))


def write_bars(warehouse: Warehouse, symbol: str, days: Sequence[date], bars: pl.DataFrame) -> None:
    warehouse.replace(bar_writes(symbol, days, bars))


_LATEST_VERSION = "ORDER BY symbol, timeframe, ts, covered_until DESC LIMIT 1 BY symbol, timeframe, ts"


def read_filed_bars(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """The bar versions filed under the days of ``[start, end)`` (``covered_until`` inside),
    as written: one row per bar and day, a multi-day bar once per day that wrote it."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(BAR_SCHEMA)}, covered_until FROM aggregates WHERE symbol = {{symbol:String}} "
        "AND ts >= {lookback:DateTime('UTC')} AND ts < {end:DateTime('UTC')} "
        "AND covered_until > {start:DateTime('UTC')} AND covered_until <= {end:DateTime('UTC')} "
        f"AND {visible('aggregates')} ORDER BY timeframe, ts",
        {"symbol": symbol, "start": start, "end": end, "lookback": start - timedelta(days=8)},
    )
    schema = {**BAR_SCHEMA, "covered_until": TS}
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    return seconds_to_datetime(frame, "ts", "covered_until").cast(schema)  # type: ignore[arg-type]


def read_bars(
    warehouse: Warehouse,
    symbol: str | None = None,
    timeframe: Timeframe | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pl.DataFrame:
    """Final bars (the most complete version of each), ordered by symbol, timeframe, ts."""
    clauses, params = [visible("aggregates")], {}
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
    frame = warehouse.query_frame(
        f"SELECT {', '.join(BAR_SCHEMA)}, covered_until FROM aggregates WHERE {' AND '.join(clauses)} {_LATEST_VERSION}",
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


_CANDLE_COLUMNS = ["symbol", "timeframe", "ts", "open", "high", "low", "close", "volume", "vwap", "tick_count", "source"]
_CANDLE_WINDOW = "symbol = {symbol:String} AND ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}"
_CANDLE_QUARANTINE_COLUMNS = ["symbol", "day", *_CANDLE_COLUMNS[1:], "reason"]
CANDLE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(), "timeframe": pl.String(), "ts": TS, "open": pl.Float64(), "high": pl.Float64(),
    "low": pl.Float64(), "close": pl.Float64(), "volume": pl.Float64(), "vwap": pl.Float64(),
    "tick_count": pl.UInt32(), "source": pl.String(),
}


def vendor_candle_writes(
    symbol: str, days: Sequence[date], candles: pl.DataFrame, quarantine: pl.DataFrame
) -> list[TableWrite]:
    params = _day_window(symbol, days)
    rows = candles.with_columns(pl.lit(symbol).alias("symbol")).select(_CANDLE_COLUMNS)
    rejected = quarantine.with_columns(pl.lit(symbol).alias("symbol")).select(_CANDLE_QUARANTINE_COLUMNS)
    return [
        TableWrite("vendor_candles", _CANDLE_WINDOW, params, rows, _scopes("vendor_candles", symbol, days)),
        TableWrite("vendor_candles_quarantine", _DAY_WINDOW, params, rejected,
                   _scopes("vendor_candles_quarantine", symbol, days)),
    ]


def write_vendor_candles(
    warehouse: Warehouse, symbol: str, days: Sequence[date], candles: pl.DataFrame, quarantine: pl.DataFrame
) -> None:
    """Replace the vendor bars of ``symbol`` opening on ``days`` and those days' quarantine
    (``quarantine`` carries the ``day`` each rejected candle is filed under)."""
    warehouse.replace(*vendor_candle_writes(symbol, days, candles, quarantine))


def read_candle_quarantine(warehouse: Warehouse, symbol: str, day: date, last: date | None = None) -> pl.DataFrame:
    return warehouse.query_frame(
        f"SELECT {', '.join(_CANDLE_QUARANTINE_COLUMNS)} FROM vendor_candles_quarantine "
        f"WHERE {_DAY_WINDOW} AND {visible('vendor_candles_quarantine')} ORDER BY day, ts",
        {"symbol": symbol, "first": day, "last": last or day},
    )


def read_vendor_candles(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Vendor bars of ``symbol`` opening in ``[start, end)``, by time."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(_CANDLE_COLUMNS)} FROM vendor_candles WHERE {_CANDLE_WINDOW} AND {visible('vendor_candles')} ORDER BY ts",
        {"symbol": symbol, "start": start, "end": end},
    )
    if frame.is_empty():
        return pl.DataFrame(schema=CANDLE_SCHEMA)
    return seconds_to_datetime(frame, "ts").cast(CANDLE_SCHEMA)  # type: ignore[arg-type]


def read_tick_minutes(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> pl.Series:
    """The minutes of ``[start, end)`` that hold at least one stored tick of ``symbol``."""
    frame = warehouse.query_frame(
        f"SELECT DISTINCT toStartOfMinute(ts) AS minute FROM market_ticks WHERE {_TS_WINDOW} "
        f"AND {visible('market_ticks')} ORDER BY minute",
        {"symbol": symbol, "start": start, "end": end},
    )
    if frame.is_empty():
        return pl.Series("minute", [], dtype=TS)
    return seconds_to_datetime(frame, "minute")["minute"]


def read_tick_count(warehouse: Warehouse, symbol: str, start: datetime, end: datetime) -> int:
    """How many ticks of ``symbol`` are stored in ``[start, end)`` (to size a run's chunks)."""
    frame = warehouse.query_frame(f"SELECT count() AS n FROM market_ticks WHERE {_TS_WINDOW} AND {visible('market_ticks')}",
                                  {"symbol": symbol, "start": start, "end": end})
    return int(frame["n"][0])
