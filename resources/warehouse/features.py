"""Reads and idempotent writes of `ml_features`, and the bar history the features need."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
from models.features.registry import FEATURE_NAMES
from models.market.instruments import instrument
from models.market.timeframes import Timeframe
from resources.warehouse.client import Warehouse
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
        "SELECT min(ts) AS first, count() AS n FROM (SELECT ts FROM aggregates FINAL WHERE symbol = {symbol:String} "
        "AND timeframe = {tf:String} AND ts < {start:DateTime('UTC')} ORDER BY ts DESC LIMIT {n:UInt32})",
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
        "SELECT max(covered_until) AS until, count() AS n FROM aggregates WHERE symbol = {symbol:String}",
        {"symbol": symbol},
    )
    return _from_epoch(frame["until"][0]) if frame["n"][0] else None


def write_features(
    warehouse: Warehouse, symbol: str, tf: Timeframe, start: datetime, end: datetime, rows: pl.DataFrame
) -> None:
    """Replace the feature rows of ``symbol``/``tf`` for bars opening in ``[start, end)``."""
    warehouse.replace(
        "ml_features",
        "symbol = {symbol:String} AND timeframe = {tf:String} AND ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}",
        {"symbol": symbol, "tf": tf.value, "start": start, "end": end},
        rows.select(FEATURE_COLUMNS),
    )


def read_features(warehouse: Warehouse, symbol: str, tf: Timeframe, start: datetime, end: datetime) -> pl.DataFrame:
    frame = warehouse.query_frame(
        f"SELECT {', '.join(FEATURE_COLUMNS)} FROM ml_features FINAL WHERE symbol = {{symbol:String}} "
        "AND timeframe = {tf:String} AND ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')} ORDER BY ts",
        {"symbol": symbol, "tf": tf.value, "start": start, "end": end},
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
