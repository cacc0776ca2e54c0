"""External data as the features see it: point-in-time, by the moment each value was known.

The warehouse keeps every FRED vintage, every commodity day and every calendar event with
its ``known_at``. These functions turn them into what :func:`compute_features` joins:

- ``values``: long rows ``(known_at, name, value)``; a bar takes, per name, the last row
  known at its close (FRED levels and changes, commodity returns);
- ``events``: high-impact events of the symbol's currencies ``(ts, known_at, surprise)``;
  a bar measures the time to the next event it could know of and since the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

UTC_MS = pl.Datetime("ms", "UTC")

FRED_FEATURE_SERIES: dict[str, tuple[str, str]] = {
    # feature stem -> (FRED series, transform): "level" or "yoy" (vs the observation a year before)
    "fedfunds": ("DFF", "level"),
    "dgs10": ("DGS10", "level"),
    "cpi_yoy": ("CPIAUCSL", "yoy"),
}
COMMODITY_FEATURE_NAMES = ("gold", "wti", "dxy")
_MAX_UNKNOWN_AHEAD = 8  # events scheduled next but not yet announced, skipped per bar


@dataclass(frozen=True, slots=True)
class ExternalData:
    values: pl.DataFrame | None = None  # (known_at, name, value)
    events: pl.DataFrame | None = None  # (ts, known_at, surprise)


def fred_values(vintages: pl.DataFrame) -> pl.DataFrame:
    """Feature rows from FRED vintages ``(series_id, observation_date, value, known_at)``.

    At each moment something was published, the latest observation then known, its value in
    the newest vintage then known, and its change from the observation before it (or the
    year-on-year ratio): the numbers a trader could have read at that moment.
    """
    frames = []
    for stem, (series_id, transform) in FRED_FEATURE_SERIES.items():
        rows = vintages.filter((pl.col("series_id") == series_id) & pl.col("value").is_not_null())
        if rows.is_empty():
            continue
        rows = rows.select("observation_date", "value", pl.col("known_at").cast(UTC_MS)).sort("known_at")
        moments = rows.select(pl.col("known_at").unique().sort())
        first_known = rows.group_by("observation_date").agg(pl.col("known_at").min()).sort("known_at").with_columns(
            pl.col("observation_date").cum_max().alias("latest")
        )
        at = moments.join_asof(first_known.select("known_at", "latest"), on="known_at", strategy="backward")
        dates = rows.select(pl.col("observation_date").unique().sort())
        if transform == "yoy":
            dates = dates.with_columns(pl.col("observation_date").dt.offset_by("-1y").alias("reference"))
        else:
            dates = dates.with_columns(pl.col("observation_date").shift(1).alias("reference"))
        at = at.join(dates.rename({"observation_date": "latest"}), on="latest", how="left")
        at = _value_as_of(at, rows, "latest", "now").pipe(_value_as_of, rows, "reference", "before")
        if transform == "yoy":
            level = pl.col("now") / pl.col("before") - 1.0
            change = level - level.shift(1)
        else:
            level, change = pl.col("now"), pl.col("now") - pl.col("before")
        out = at.select("known_at", level.alias(f"fred_{stem}"), change.alias(f"fred_{stem}_change"))
        frames.append(out.unpivot(index="known_at", variable_name="name", value_name="value"))
    return _long(frames)


def _value_as_of(at: pl.DataFrame, rows: pl.DataFrame, date_column: str, alias: str) -> pl.DataFrame:
    """Per moment, the value of observation ``date_column`` in the newest vintage known then."""
    vintages = rows.rename({"observation_date": date_column, "value": alias}).sort("known_at")
    # both sides are sorted by known_at just above; polars cannot verify that per group
    return at.sort("known_at").join_asof(vintages, on="known_at", by=date_column, strategy="backward", check_sortedness=False)


def commodity_values(prices: pl.DataFrame) -> pl.DataFrame:
    """``commodity_<name>_ret_1d`` rows from daily closes ``(name, date, close, known_at)``."""
    rows = prices.filter(pl.col("name").is_in(COMMODITY_FEATURE_NAMES) & pl.col("close").is_not_null()).sort("name", "date")
    out = rows.select(
        pl.col("known_at").cast(UTC_MS),
        pl.format("commodity_{}_ret_1d", pl.col("name")).alias("name"),
        (pl.col("close") / pl.col("close").shift(1).over("name") - 1.0).alias("value"),
    ).drop_nulls("value")
    return _long([out])


def symbol_events(events: pl.DataFrame, currencies: tuple[str, ...]) -> pl.DataFrame:
    """High-impact events of ``currencies``: ``(ts, known_at, surprise)`` sorted by time.

    ``surprise`` = (actual - forecast) / |forecast|, known from the release time ``ts``.
    """
    high = events.filter((pl.col("impact") == "high") & pl.col("currency").is_in(list(currencies)))
    surprise = pl.when(pl.col("forecast").abs() > 0).then((pl.col("actual") - pl.col("forecast")) / pl.col("forecast").abs())
    return high.select(pl.col("ts").cast(UTC_MS), pl.col("known_at").cast(UTC_MS), surprise.alias("surprise")).sort("ts")


def event_features(close_ts: pl.Series, events: pl.DataFrame | None) -> dict[str, np.ndarray]:
    """Hours to the next event known at each close, hours since the last, its surprise."""
    n = close_ts.len()
    out = {name: np.full(n, np.nan) for name in ("event_hours_to_next", "event_hours_since_last", "event_last_surprise")}
    if events is None or events.is_empty() or n == 0:
        return out
    t = close_ts.cast(UTC_MS).dt.epoch("ms").to_numpy()
    ts = events["ts"].cast(UTC_MS).dt.epoch("ms").to_numpy()
    known = events["known_at"].cast(UTC_MS).dt.epoch("ms").to_numpy()
    surprise = events["surprise"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    hour = 3_600_000.0
    last = np.searchsorted(ts, t, side="right") - 1  # events at or before the close have happened
    happened = last >= 0
    out["event_hours_since_last"] = np.where(happened, (t - ts[np.clip(last, 0, None)]) / hour, np.nan)
    # the last surprise: latest event at or before the close that has one
    has = ~np.isnan(surprise)
    latest_with = np.maximum.accumulate(np.where(has, np.arange(len(ts)), -1))
    pick = np.where(happened, latest_with[np.clip(last, 0, None)], -1)
    out["event_last_surprise"] = np.where(pick >= 0, surprise[np.clip(pick, 0, None)], np.nan)
    # the next event that was already announced at the close
    nxt = np.full(n, np.nan)
    for k in range(_MAX_UNKNOWN_AHEAD):
        index = last + 1 + k
        valid = (index < len(ts)) & np.isnan(nxt)
        safe = np.clip(index, 0, len(ts) - 1)
        usable = valid & (known[safe] <= t)
        nxt = np.where(usable, (ts[safe] - t) / hour, nxt)
    out["event_hours_to_next"] = nxt
    return out


def _long(frames: list[pl.DataFrame]) -> pl.DataFrame:
    schema = {"known_at": UTC_MS, "name": pl.String(), "value": pl.Float64()}
    frames = [f.select(pl.col("known_at").cast(UTC_MS), pl.col("name").cast(pl.String), pl.col("value").cast(pl.Float64)) for f in frames]
    return pl.concat(frames).drop_nulls("value") if frames else pl.DataFrame(schema=schema)
