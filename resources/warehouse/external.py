"""Reads and idempotent writes of the external tables (FRED vintages, commodities, calendar)."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import polars as pl

from resources.warehouse.connection import TableWrite, Warehouse
from resources.warehouse.commits import PARTITIONED, visible
from resources.warehouse.market import seconds_to_datetime

UTC_MS = pl.Datetime("ms", "UTC")
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(), "ts": UTC_MS, "currency": pl.String(), "impact": pl.String(), "title": pl.String(),
    "actual": pl.Float64(), "forecast": pl.Float64(), "previous": pl.Float64(),
    "actual_text": pl.String(), "forecast_text": pl.String(), "previous_text": pl.String(),
    "known_at": UTC_MS, "source": pl.String(),
}
_FRED_COLUMNS = ["series_id", "observation_date", "value", "realtime_start", "known_at", "week", "source"]
_COMMODITY_COLUMNS = ["name", "ticker", "date", "open", "high", "low", "close", "volume", "currency", "known_at", "source"]
_EVENT_COLUMNS = ["event_id", "ts", "currency", "impact", "title", "actual", "forecast", "previous",
                  "actual_text", "forecast_text", "previous_text", "known_at", "source"]


def write_fred_week(warehouse: Warehouse, week: date, rows: pl.DataFrame) -> None:
    """Replace what the publication week ``week`` wrote."""
    frame = rows.with_columns(pl.lit(week).alias("week")).select(_FRED_COLUMNS)
    warehouse.replace(TableWrite("external_fred_indicators", "week = {week:Date}", {"week": week}, frame,
                                 [PARTITIONED["external_fred_indicators"].scope(week)]))


def read_fred_vintages(warehouse: Warehouse, series: list[str], known_until: datetime) -> pl.DataFrame:
    """Every vintage of ``series`` known by ``known_until``, one row per (observation, vintage)."""
    frame = warehouse.query_frame(
        "SELECT series_id, observation_date, any(value) AS value, realtime_start, min(known_at) AS first_known "
        "FROM external_fred_indicators WHERE series_id IN {series:Array(String)} AND known_at <= {until:DateTime('UTC')} "
        f"AND {visible('external_fred_indicators')} "
        "GROUP BY series_id, observation_date, realtime_start ORDER BY series_id, observation_date, realtime_start",
        {"series": series, "until": known_until},
    )
    schema = {"series_id": pl.String(), "observation_date": pl.Date(), "value": pl.Float64(),
              "realtime_start": pl.Date(), "known_at": UTC_MS}
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    return seconds_to_datetime(frame.rename({"first_known": "known_at"}), "known_at").cast(schema)  # type: ignore[arg-type]


def latest_fred_values(warehouse: Warehouse, series: list[str], before_week: date) -> pl.DataFrame:
    """Per (series, observation), the newest value stored by the weeks before ``before_week``
    and when it was published: what a later week's download repeats unless it changed."""
    frame = warehouse.query_frame(
        "SELECT series_id, observation_date, argMax(value, realtime_start) AS value, max(realtime_start) AS published "
        "FROM external_fred_indicators WHERE series_id IN {series:Array(String)} AND week < {week:Date} "
        f"AND {visible('external_fred_indicators')} "
        "GROUP BY series_id, observation_date",
        {"series": series, "week": before_week},
    )
    schema = {"series_id": pl.String(), "observation_date": pl.Date(), "value": pl.Float64(), "published": pl.Date()}
    return frame.cast(schema) if frame.height else pl.DataFrame(schema=schema)  # type: ignore[arg-type]


def write_commodity_day(warehouse: Warehouse, day: date, rows: pl.DataFrame) -> None:
    warehouse.replace(TableWrite("external_commodity_prices", "date = {day:Date}", {"day": day},
                                 rows.select(_COMMODITY_COLUMNS), [PARTITIONED["external_commodity_prices"].scope(day)]))


def read_commodities(warehouse: Warehouse, names: list[str], start: date, known_until: datetime) -> pl.DataFrame:
    frame = warehouse.query_frame(
        f"SELECT {', '.join(_COMMODITY_COLUMNS)} FROM external_commodity_prices "
        "WHERE name IN {names:Array(String)} AND date >= {start:Date} AND known_at <= {until:DateTime('UTC')} "
        f"AND {visible('external_commodity_prices')} ORDER BY name, date",
        {"names": names, "start": start, "until": known_until},
    )
    if frame.is_empty():
        return pl.DataFrame(schema={"name": pl.String(), "date": pl.Date(), "close": pl.Float64(), "known_at": UTC_MS})
    return seconds_to_datetime(frame, "known_at").with_columns(pl.col("known_at").cast(UTC_MS), pl.col("name").cast(pl.String))


def write_calendar_day(warehouse: Warehouse, start: datetime, end: datetime, events: pl.DataFrame) -> pl.DataFrame:
    """Replace the events scheduled in ``[start, end)`` (whole UTC days); an event keeps the earliest
    ``known_at`` ever stored for it, so re-fetching a past day never makes its events look
    announced later than they were. Returns what was written."""
    params = {"start": start, "end": end}
    where = "ts >= {start:DateTime('UTC')} AND ts < {end:DateTime('UTC')}"
    stored = warehouse.query_frame(f"SELECT event_id, min(known_at) AS first_known FROM external_economic_calendar WHERE {where} "
                                   f"AND {visible('external_economic_calendar')} GROUP BY event_id", params)
    rows = events.with_columns(pl.col("known_at").min().over("event_id")).unique("event_id", keep="last", maintain_order=True)
    if not stored.is_empty():
        first = seconds_to_datetime(stored, "first_known").with_columns(pl.col("event_id").cast(pl.String), pl.col("first_known").cast(UTC_MS))
        rows = rows.join(first, on="event_id", how="left").with_columns(
            pl.min_horizontal("known_at", "first_known").alias("known_at")
        ).drop("first_known")
    rows = rows.select(_EVENT_COLUMNS)
    days = [start.date() + timedelta(days=i) for i in range((end - start).days)]
    warehouse.replace(TableWrite("external_economic_calendar", where, params, rows,
                                 [PARTITIONED["external_economic_calendar"].scope(day) for day in days]))
    return rows


def read_calendar(warehouse: Warehouse, currencies: list[str] | None, start: datetime, end: datetime) -> pl.DataFrame:
    """Events scheduled in ``[start, end)`` (of ``currencies`` if given), by time."""
    clause = " AND currency IN {currencies:Array(String)}" if currencies else ""
    frame = warehouse.query_frame(
        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM external_economic_calendar "
        f"WHERE ts >= {{start:DateTime('UTC')}} AND ts < {{end:DateTime('UTC')}}{clause} "
        f"AND {visible('external_economic_calendar')} ORDER BY ts",
        {"start": start, "end": end, "currencies": currencies or []},
    )
    if frame.is_empty():
        return pl.DataFrame(schema=EVENT_SCHEMA)
    return seconds_to_datetime(frame, "ts", "known_at").with_columns(
        pl.col("ts", "known_at").cast(UTC_MS), pl.col("currency", "impact", "source").cast(pl.String)
    )
