"""Economic calendar: scheduled releases with currency, impact, actual/forecast/previous.

Two sources, one shape. The public feed is the Forex Factory weekly JSON export
(``ff_calendar_thisweek.json``: title, country = currency, date with offset, impact,
forecast, previous); it covers the current week only, so history comes from files:
CSV under ``directory`` with columns ``ts, currency, impact, title, actual, forecast,
previous`` and optionally ``known_at`` (when the event was announced; default
``ts - schedule_lead_days``).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from resources.vendors.base import (
    RetryBudget,
    VendorPayloadError,
    attempts_field,
    backoff_field,
    budget_field,
    http_get,
    refused,
    with_retries,
)
from resources.warehouse.external import EVENT_SCHEMA  # the table's shape, defined where it is read

UTC_MS = pl.Datetime("ms", "UTC")
_IMPACTS = {"high": "high", "medium": "medium", "low": "low", "holiday": "holiday", "non-economic": "low"}
_FILE_COLUMNS = ("ts", "currency", "impact", "title")


def parse_number(text: pl.Expr) -> pl.Expr:
    """'0.4%' -> 0.4, '200K' -> 200000, '-1.2B' -> -1.2e9, '' -> null: the scale of each figure."""
    cleaned = text.str.strip_chars().str.replace_all(r"[%,<>]", "")
    scale = (
        pl.when(cleaned.str.ends_with("K")).then(1e3)
        .when(cleaned.str.ends_with("M")).then(1e6)
        .when(cleaned.str.ends_with("B")).then(1e9)
        .when(cleaned.str.ends_with("T")).then(1e12)
        .otherwise(1.0)
    )
    return cleaned.str.replace(r"[KMBT]$", "").cast(pl.Float64, strict=False) * scale


def _finish(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Typed events with numbers parsed and a stable id (currency, title, time)."""
    for name in ("actual_text", "forecast_text", "previous_text"):
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(name))
    return frame.with_columns(
        pl.col("impact").str.to_lowercase().replace_strict(_IMPACTS, default="low"),
        pl.col("currency").str.to_uppercase(),
        parse_number(pl.col("actual_text")).alias("actual"),
        parse_number(pl.col("forecast_text")).alias("forecast"),
        parse_number(pl.col("previous_text")).alias("previous"),
        pl.lit(source).alias("source"),
    ).with_columns(
        pl.concat_str("currency", "title", pl.col("ts").dt.epoch("s").cast(pl.String), separator="|")
        .map_batches(lambda keys: pl.Series([hashlib.sha1(k.encode()).hexdigest()[:16] for k in keys], dtype=pl.String))
        .alias("event_id")
    ).select(list(EVENT_SCHEMA)).cast(EVENT_SCHEMA)  # type: ignore[arg-type]


class EconomicCalendarResource(ConfigurableResource):
    """The weekly feed and calendar files. ``feed_url`` empty: files only."""

    feed_url: str = Field(default="https://nfs.faireconomy.media/ff_calendar_thisweek.json")
    directory: str = Field(default="", description="CSV files of past events; empty: $TRADEFORGE_HOME/imports/calendar")
    schedule_lead_days: float = Field(default=7.0, ge=0, description="files without known_at: events were known this long before")
    attempts: int = attempts_field()
    retry_budget_s: float = budget_field()
    backoff_s: float = backoff_field(2.0)
    timeout_s: float = Field(default=10.0, gt=0, description="connect and read timeout of one try (capped by the budget)")

    @property
    def budget(self) -> RetryBudget:
        return RetryBudget(self.attempts, self.retry_budget_s, self.backoff_s)

    def feed(self, fetched_at: datetime) -> pl.DataFrame:
        """The feed's events, each known from ``fetched_at`` (the moment we saw it)."""
        if not self.feed_url:
            return pl.DataFrame(schema=EVENT_SCHEMA)
        body = with_retries(self._get, budget=self.budget, what=f"calendar feed {self.feed_url}")
        if not isinstance(body, list) or any(not isinstance(e, dict) for e in body):
            raise VendorPayloadError(f"calendar feed: expected a list of events, got {str(body)[:120]}")
        if not body:
            return pl.DataFrame(schema=EVENT_SCHEMA)
        missing = [e for e in body if not {"title", "country", "date", "impact"} <= e.keys()]
        if missing:
            raise VendorPayloadError(f"calendar feed: {len(missing)} event(s) lack title/country/date/impact: {missing[0]}")
        raw = pl.from_dicts(body, schema={"title": pl.String, "country": pl.String, "date": pl.String, "impact": pl.String,
                                          "forecast": pl.String, "previous": pl.String, "actual": pl.String}, strict=False)
        try:
            ts = pl.col("date").str.to_datetime("%Y-%m-%dT%H:%M:%S%z", strict=True, time_unit="ms").dt.convert_time_zone("UTC")
            events = raw.select(
                ts.alias("ts"), pl.col("country").alias("currency"), "impact", "title",
                pl.col("actual").alias("actual_text"), pl.col("forecast").alias("forecast_text"),
                pl.col("previous").alias("previous_text"), pl.lit(fetched_at).cast(UTC_MS).alias("known_at"),
            )
        except pl.exceptions.PolarsError as exc:
            raise VendorPayloadError(f"calendar feed: event dates are not ISO 8601 with offset: {exc}") from None
        return _finish(events, "forexfactory")

    def from_files(self, start: datetime, end: datetime) -> pl.DataFrame:
        """Events in ``[start, end)`` from every CSV under the calendar directory."""
        from resources.warehouse.client import default_home

        root = Path(self.directory) if self.directory else default_home() / "imports" / "calendar"
        frames = []
        for path in sorted(root.glob("*.csv")) if root.is_dir() else []:
            raw = pl.read_csv(path, infer_schema=False)
            lacking = sorted(set(_FILE_COLUMNS) - set(raw.columns))
            if lacking:
                raise VendorPayloadError(f"{path}: calendar file lacks column(s) {lacking}; has {raw.columns}")
            try:
                ts = pl.col("ts").str.to_datetime(time_unit="ms", time_zone="UTC", strict=True)
                lead = timedelta(days=self.schedule_lead_days)
                known = (pl.col("known_at").str.to_datetime(time_unit="ms", time_zone="UTC", strict=True)
                         if "known_at" in raw.columns else ts - lead)
                events = raw.select(
                    ts.alias("ts"), "currency", "impact", "title",
                    *(pl.col(c).alias(f"{c}_text") if c in raw.columns else pl.lit(None, pl.String).alias(f"{c}_text")
                      for c in ("actual", "forecast", "previous")),
                    known.alias("known_at"),
                ).filter((pl.col("ts") >= start) & (pl.col("ts") < end))
            except pl.exceptions.PolarsError as exc:
                raise VendorPayloadError(f"{path}: times must be ISO 8601 (UTC unless an offset is given): {exc}") from None
            frames.append(_finish(events, f"file:{path.name}"))
        return pl.concat(frames) if frames else pl.DataFrame(schema=EVENT_SCHEMA)

    def _get(self) -> object:
        response = http_get(self.feed_url, timeout_s=self.timeout_s)
        if response.status_code != 200:
            raise refused("calendar feed", response.status_code, response.text, setting="CALENDAR_FEED_URL")
        try:
            return response.json()
        except ValueError:
            raise VendorPayloadError(f"calendar feed: body is not JSON: {response.text[:120]!r}") from None
