"""Reads and idempotent writes of `ml_features`, and the bar history the features need."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import polars as pl

from models.features.external import (
    COMMODITY_FEATURE_NAMES,
    FRED_FEATURE_SERIES,
    ExternalData,
    commodity_values,
    fred_values,
    symbol_events,
)
from models.features.labels import LABEL_SCHEMA
from models.features.registry import FEATURE_NAMES, feature_set_version
from models.market.instruments import instrument
from models.market.timeframes import Timeframe
from resources.warehouse.connection import TableWrite, Warehouse
from resources.warehouse.commits import PARTITIONED, visible
from resources.warehouse.external import read_calendar, read_commodities, read_fred_vintages
from resources.warehouse.market import read_bars, seconds_to_datetime

FEATURE_COLUMNS = ["symbol", "timeframe", "ts", "close_ts", "feature_set", "warm", *FEATURE_NAMES, *LABEL_SCHEMA]


def bars_around(
    warehouse: Warehouse, symbol: str, tf: Timeframe, start: datetime, end: datetime, history: int
) -> tuple[pl.DataFrame, int]:
    """``history`` bars before ``start``, then every bar from ``start`` until ``end``.

    Returns the bars and how many of them came before ``start``.
    """
    before = warehouse.query_frame(
        "SELECT min(ts) AS first, count() AS n FROM (SELECT ts FROM aggregates WHERE symbol = {symbol:String} "
        f"AND timeframe = {{tf:String}} AND ts < {{start:DateTime('UTC')}} AND {visible('aggregates')} "
        "GROUP BY ts ORDER BY ts DESC LIMIT {n:UInt32})",
        {"symbol": symbol, "tf": tf.value, "start": start, "n": history},
    ).row(0, named=True)
    first = _from_epoch(before["first"]) if before["n"] else start
    bars = read_bars(warehouse, symbol, tf, start=first, end=end)
    return bars.drop("covered_until"), before["n"]


def _from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(int(seconds), UTC)


def data_horizon(warehouse: Warehouse, symbol: str) -> datetime | None:
    """The moment up to which the warehouse holds this symbol's data (end of the last day loaded)."""
    frame = warehouse.query_frame(
        f"SELECT max(covered_until) AS until, count() AS n FROM aggregates WHERE symbol = {{symbol:String}} AND {visible('aggregates')}",
        {"symbol": symbol},
    )
    return _from_epoch(frame["until"][0]) if frame["n"][0] else None


_FEATURE_WINDOW = ("symbol = {symbol:String} AND feature_set = {feature_set:String} "
                   "AND ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}")


def feature_writes(symbol: str, feature_set: str, days: Sequence[date], rows: pl.DataFrame) -> TableWrite:
    first, last = min(days), max(days)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    scopes = [PARTITIONED["ml_features"].scope(symbol, feature_set, day) for day in days]
    params = {"symbol": symbol, "feature_set": feature_set, "start": start, "end": end}
    return TableWrite("ml_features", _FEATURE_WINDOW, params, rows.select(FEATURE_COLUMNS), scopes)


def write_features(warehouse: Warehouse, symbol: str, feature_set: str, days: Sequence[date], rows: pl.DataFrame) -> None:
    """Replace the feature rows of ``symbol`` in ``feature_set`` for bars opening on ``days``
    (contiguous), every timeframe at once, all or nothing."""
    warehouse.replace(feature_writes(symbol, feature_set, days, rows))


def read_features(
    warehouse: Warehouse, symbol: str, tf: Timeframe, start: datetime, end: datetime, feature_set: str | None = None
) -> pl.DataFrame:
    """Feature rows of one feature set (the current one unless given), by bar."""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(FEATURE_COLUMNS)} FROM ml_features WHERE symbol = {{symbol:String}} AND timeframe = {{tf:String}} "
        f"AND feature_set = {{feature_set:String}} AND ts >= {{start:DateTime('UTC')}} AND ts < {{end:DateTime('UTC')}} "
        f"AND {visible('ml_features')} ORDER BY ts",
        {"symbol": symbol, "tf": tf.value, "start": start, "end": end, "feature_set": feature_set or feature_set_version()},
    )
    return seconds_to_datetime(frame, "ts", "close_ts") if frame.height else frame


def read_external(warehouse: Warehouse, symbol: str, first_bar: datetime, end: datetime) -> ExternalData:
    """What the external tables knew for bars from ``first_bar`` to ``end``, shaped for the
    features: FRED and commodity values by ``known_at``, the symbol's currencies' events.

    Rows known after ``end`` are not read at all; within the window the as-of join by each
    bar's close decides what the bar sees.
    """
    vintages = read_fred_vintages(warehouse, [series for series, _ in FRED_FEATURE_SERIES.values()], end)
    prices = read_commodities(warehouse, list(COMMODITY_FEATURE_NAMES), (first_bar - timedelta(days=14)).date(), end)
    events = read_calendar(warehouse, list(instrument(symbol).currencies), first_bar - timedelta(days=31), end + timedelta(days=31))
    values = pl.concat([fred_values(vintages), commodity_values(prices)])
    return ExternalData(values=values, events=symbol_events(events, instrument(symbol).currencies))


def read_external_update(warehouse: Warehouse, since: datetime, now: datetime) -> tuple[pl.DataFrame, pl.DataFrame, datetime]:
    """What a live runner replaces of its external data (:mod:`resources.bus.external`): the
    values known from ``since`` to ``now``, derived exactly as :func:`read_external` derives
    them (from every FRED vintage known by ``now``, commodity returns from two weeks before),
    and every currency's high-impact calendar events (the only ones the features use) scheduled
    from ``since`` to a month after ``now``."""
    until = now + timedelta(days=31)
    vintages = read_fred_vintages(warehouse, [series for series, _ in FRED_FEATURE_SERIES.values()], now)
    prices = read_commodities(warehouse, list(COMMODITY_FEATURE_NAMES), (since - timedelta(days=14)).date(), now)
    values = pl.concat([fred_values(vintages), commodity_values(prices)]).filter(pl.col("known_at") >= since)
    events = read_calendar(warehouse, None, since, until).filter(pl.col("impact") == "high")
    return values, events.select("ts", "known_at", "currency", "impact", "actual", "forecast"), until


def store_feature_rows(warehouse: Warehouse, rows: pl.DataFrame) -> None:
    """Write feature rows made elsewhere (a file, a test's planted frame): per symbol and
    feature set, every UTC day they span replaced, as the asset writes them."""
    for (symbol, feature_set), part in rows.partition_by("symbol", "feature_set", as_dict=True).items():
        first, last = part["ts"].min().date(), part["ts"].max().date()
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        write_features(warehouse, symbol, feature_set, days, part)
