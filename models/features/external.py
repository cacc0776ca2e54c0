"""External data as the features see it: point-in-time, by the moment each value was known.

The warehouse keeps every FRED vintage, every commodity day and every calendar event with
its ``known_at``. These functions turn them into what :func:`compute_features` joins:

- ``values``: long rows ``(known_at, name, value)``; a bar takes, per name, the last row
  known at its close (FRED levels and changes, commodity returns);
- ``events``: high-impact events of the symbol's currencies ``(ts, known_at, surprise)``;
  a bar measures the time to the next event it could know of and since the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

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


@dataclass(frozen=True)
class ExternalData:
    """What the features may join, prepared once as sorted arrays, so that looking up a
    partition's bar closes or the live runner's newest close is a binary search (the same
    code for both; the live vector cannot afford a polars join per bar)."""

    values: pl.DataFrame | None = None  # (known_at, name, value)
    events: pl.DataFrame | None = None  # (ts, known_at, surprise)
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    value_arrays: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)
    event_arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, keys, values = _value_arrays(self.values)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "value_arrays", (keys, values))
        object.__setattr__(self, "event_arrays", _event_arrays(self.events))

    def known_by(self, moment: datetime) -> ExternalData:
        """What could be known at ``moment``: values known by then, events announced or past."""
        values = None if self.values is None else self.values.filter(pl.col("known_at") <= moment)
        events = None if self.events is None else self.events.filter((pl.col("known_at") <= moment) | (pl.col("ts") <= moment))
        return ExternalData(values, events)

    def values_at(self, close_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Per name, the value known last at or before each close (epoch ms); NaN before any.

        One binary search for every name at once: the rows are sorted by the key
        ``name index * 2**42 + known_at ms``, so a close's key for a name finds that name's
        last row known by then, or a row of an earlier name (nothing known yet)."""
        keys, values = self.value_arrays
        index = np.arange(len(self.names))[:, None]
        last = np.searchsorted(keys, (index << _NAME_SHIFT) + close_ms[None, :], side="right") - 1
        found = (last >= 0) & ((keys[np.maximum(last, 0)] >> _NAME_SHIFT) == index)
        picked = np.where(found, values[np.maximum(last, 0)], np.nan)
        return dict(zip(self.names, picked, strict=True))


_NAME_SHIFT = 42  # epoch milliseconds stay below 2**42 until the year 2109


def _value_arrays(values: pl.DataFrame | None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Names, sorted lookup keys (see :meth:`ExternalData.values_at`) and values. Rows known
    at the same moment keep their order, so the one given last is the one a lookup finds."""
    if values is None or values.is_empty():
        return (), np.empty(0, dtype=np.int64), np.empty(0)
    names = tuple(sorted(values["name"].cast(pl.String).unique()))
    rows = values.select(
        (pl.col("name").cast(pl.String).replace_strict(names, range(len(names)), return_dtype=pl.Int64) * 2**_NAME_SHIFT
         + pl.col("known_at").cast(UTC_MS).dt.epoch("ms")).alias("key"),
        pl.col("value").cast(pl.Float64).fill_null(np.nan),
    ).drop_nulls("key").sort("key", maintain_order=True)  # a value never known joins no bar
    return names, rows["key"].to_numpy(), rows["value"].to_numpy()


def _event_arrays(events: pl.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """By release time: release times and when each was known (epoch ms), surprises, and
    the index of the latest event up to each one that has a surprise (-1: none yet)."""
    if events is None or events.is_empty():
        return None
    ordered = events.sort("ts", maintain_order=True)
    surprise = ordered["surprise"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    latest_with = np.maximum.accumulate(np.where(np.isnan(surprise), -1, np.arange(len(surprise))))
    return (
        ordered["ts"].cast(UTC_MS).dt.epoch("ms").to_numpy(),
        ordered["known_at"].cast(UTC_MS).dt.epoch("ms").to_numpy(),
        surprise,
        latest_with,
    )


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
    """High-impact releases of ``currencies``: ``(ts, known_at, surprise)``, one row per time.

    ``surprise`` = (actual - forecast) / |forecast|, known from the release time ``ts``. Events
    released at the same time are one release: known when the first of them was, its surprise
    the mean of theirs. (Rows at one time have no order, in the calendar or in a read of it, so
    "the last of them" would make two reads of the same data give different features.)
    """
    high = events.filter((pl.col("impact") == "high") & pl.col("currency").is_in(list(currencies)))
    surprise = pl.when(pl.col("forecast").abs() > 0).then((pl.col("actual") - pl.col("forecast")) / pl.col("forecast").abs())
    rows = high.select(pl.col("ts").cast(UTC_MS), pl.col("known_at").cast(UTC_MS), surprise.cast(pl.Float64).alias("surprise"))
    return rows.group_by("ts").agg(pl.col("known_at").min(), pl.col("surprise").mean()).sort("ts")


def event_features(close_ms: np.ndarray, events: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Hours to the next event known at each close (epoch ms), hours since the last, its surprise."""
    n = len(close_ms)
    if events is None or n == 0:
        return {name: np.full(n, np.nan) for name in ("event_hours_to_next", "event_hours_since_last", "event_last_surprise")}
    t = close_ms
    ts, known, surprise, latest_with = events
    hour = 3_600_000.0
    last = np.searchsorted(ts, t, side="right") - 1  # events at or before the close have happened
    happened = last >= 0
    last_or_first = np.maximum(last, 0)  # a valid index where none happened (masked below)
    out = {"event_hours_since_last": np.where(happened, (t - ts[last_or_first]) / hour, np.nan)}
    # the last surprise: latest event at or before the close that has one
    pick = np.where(happened, latest_with[last_or_first], -1)
    out["event_last_surprise"] = np.where(pick >= 0, surprise[np.maximum(pick, 0)], np.nan)
    # the next event that was already announced at the close, among the next few scheduled
    ahead = (last + 1)[:, None] + np.arange(_MAX_UNKNOWN_AHEAD)
    safe = np.minimum(ahead, len(ts) - 1)
    usable = (ahead < len(ts)) & (known[safe] <= t[:, None])
    first = usable.argmax(axis=1)
    rows = np.arange(n)
    out["event_hours_to_next"] = np.where(usable[rows, first], (ts[safe[rows, first]] - t) / hour, np.nan)
    return out


def _long(frames: list[pl.DataFrame]) -> pl.DataFrame:
    schema = {"known_at": UTC_MS, "name": pl.String(), "value": pl.Float64()}
    frames = [f.select(pl.col("known_at").cast(UTC_MS), pl.col("name").cast(pl.String), pl.col("value").cast(pl.Float64)) for f in frames]
    return pl.concat(frames).drop_nulls("value") if frames else pl.DataFrame(schema=schema)
