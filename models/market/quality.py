"""Tick and vendor-candle validation: every bad row gets a reason and goes to quarantine,
none is dropped.

A row is a duplicate only when the source says so: the same vendor id or sequence number
(``vendor_seq``) twice, as when a page is fetched twice. Identical prints at one timestamp are
separate fills and identical quotes are separate updates: both are kept.

The same classification validates a vendor's rows before they are written and checks the
stored partition afterwards (asset checks), so "clean" means one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from models.market.candles import sort_ticks
from models.market.instruments import AssetClass
from models.market.sessions import trading_open
from models.market.ticks import TS
from models.market.timeframes import DayBoundary, Timeframe, bar_open_expr

REASONS = (
    "wrong_symbol",
    "missing_timestamp",
    "outside_partition",
    "non_finite_price",
    "non_positive_price",
    "implausible_price",
    "no_price",
    "negative_size",
    "crossed_quote",
    "locked_quote",
    "implausible_spread",
    "duplicate",
)
_PRICE_COLUMNS = ("bid", "ask", "price")


@dataclass(frozen=True, slots=True)
class TickRules:
    """Limits for what counts as a plausible tick; defaults suit FX, metals and crypto."""

    max_spread_ratio: float = 50.0  # spread vs the partition's median spread
    max_relative_spread: float = 0.05  # spread vs mid, whatever the median says
    max_gap: timedelta = timedelta(minutes=5)  # longest silence allowed while the market is open


@dataclass(frozen=True)
class TickValidation:
    clean: pl.DataFrame  # sorted by time, stable among equal timestamps, with a `seq` column
    quarantine: pl.DataFrame  # the rejected rows as received, with a `reason` column
    out_of_order: int  # clean rows that arrived earlier than the tick before them
    reason_counts: dict[str, int] = field(default_factory=dict)


def _finite_positive(column: str) -> tuple[pl.Expr, pl.Expr]:
    value = pl.col(column)
    return value.is_not_null() & ~value.is_finite(), value.is_not_null() & (value <= 0)


def outside_band(columns: tuple[str, ...], band: tuple[float, float] | None) -> pl.Expr:
    """Some price outside the instrument's plausible band (EURUSD levels under XAUUSD)."""
    if band is None:
        return pl.lit(False)
    low, high = band
    return pl.any_horizontal(*((pl.col(c) < low) | (pl.col(c) > high) for c in columns)).fill_null(False)


def reason_expr(
    symbol: str, start: datetime, end: datetime, median_spread: float | None, rules: TickRules,
    band: tuple[float, float] | None = None,
) -> pl.Expr:
    """The first reason a tick is bad, or null; duplicates are found separately."""
    non_finite = pl.any_horizontal(*(_finite_positive(c)[0] for c in _PRICE_COLUMNS))
    non_positive = pl.any_horizontal(*(_finite_positive(c)[1] for c in _PRICE_COLUMNS))
    quote = pl.col("bid").is_not_null() & pl.col("ask").is_not_null()
    spread = pl.col("ask") - pl.col("bid")
    mid = (pl.col("ask") + pl.col("bid")) * 0.5
    too_wide = quote & (spread > mid * rules.max_relative_spread)
    if median_spread is not None and median_spread > 0:
        too_wide = too_wide | (quote & (spread > median_spread * rules.max_spread_ratio))
    sizes = pl.any_horizontal(*(pl.col(c).fill_null(0) < 0 for c in ("bid_size", "ask_size", "size")))
    half_quote = pl.col("bid").is_null() != pl.col("ask").is_null()
    return (
        pl.when(pl.col("symbol").is_null() | (pl.col("symbol") != symbol)).then(pl.lit("wrong_symbol"))
        .when(pl.col("ts").is_null()).then(pl.lit("missing_timestamp"))
        .when((pl.col("ts") < start) | (pl.col("ts") >= end)).then(pl.lit("outside_partition"))
        .when(non_finite).then(pl.lit("non_finite_price"))
        .when(non_positive).then(pl.lit("non_positive_price"))
        .when(outside_band(_PRICE_COLUMNS, band)).then(pl.lit("implausible_price"))
        .when(half_quote | (~quote & pl.col("price").is_null())).then(pl.lit("no_price"))
        .when(sizes).then(pl.lit("negative_size"))
        .when(quote & (spread < 0)).then(pl.lit("crossed_quote"))
        .when(quote & (spread == 0)).then(pl.lit("locked_quote"))
        .when(too_wide).then(pl.lit("implausible_spread"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _median_spread(ticks: pl.DataFrame) -> float | None:
    """Median spread of the two-sided, uncrossed, finite quotes: the yardstick for 'too wide'."""
    spread = (ticks["ask"] - ticks["bid"]).drop_nulls()
    spread = spread.filter(spread.is_finite() & (spread > 0))
    return float(spread.median()) if spread.len() else None


def validate_ticks(
    raw: pl.DataFrame, symbol: str, start: datetime, end: datetime, rules: TickRules = TickRules(),
    band: tuple[float, float] | None = None,
) -> TickValidation:
    """Split ``raw`` ticks (TICK_SCHEMA) of ``symbol`` in ``[start, end)`` into clean and
    quarantined; ``band`` is the plausible price range of the symbol (see
    :meth:`Instrument.plausible_prices`)."""
    reasons = reason_expr(symbol, start, end, _median_spread(raw), rules, band)
    if "vendor_seq" in raw.columns:  # a second row with one source's own id: the same row sent twice
        repeated = pl.col("vendor_seq").is_not_null() & ~pl.struct("source", "vendor_seq").is_first_distinct()
    else:
        repeated = pl.lit(False)
    clean, quarantine, counts = _split(raw, reasons, repeated=repeated)
    out_of_order = int((clean["ts"].diff() < timedelta(0)).sum())
    clean = sort_ticks(clean).with_row_index("seq").with_columns(pl.col("seq").cast(pl.UInt32))
    return TickValidation(clean=clean, quarantine=quarantine, out_of_order=out_of_order, reason_counts=counts)


def _split(raw: pl.DataFrame, reasons: pl.Expr, repeated: pl.Expr) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Rows without a reason (in arrival order), the others with their ``reason``, and the
    count per reason. A good row for which ``repeated`` holds (a second copy by the source's
    own key) is a ``duplicate``: judged among good rows only, so a bad first copy cannot make a
    good second copy look duplicated."""
    tagged = raw.with_row_index("_arrival").with_columns(reasons.alias("reason"))
    repeated = tagged.filter(pl.col("reason").is_null()).filter(repeated)["_arrival"]
    tagged = tagged.with_columns(
        pl.when(pl.col("_arrival").is_in(repeated.implode())).then(pl.lit("duplicate")).otherwise("reason").alias("reason")
    )
    clean = tagged.filter(pl.col("reason").is_null()).drop("reason", "_arrival")
    quarantine = tagged.filter(pl.col("reason").is_not_null()).drop("_arrival")
    return clean, quarantine, dict(quarantine.group_by("reason").len().iter_rows())


def stored_violations(
    ticks: pl.DataFrame, symbol: str, start: datetime, end: datetime, rules: TickRules = TickRules(),
    band: tuple[float, float] | None = None,
) -> dict[str, int]:
    """Reason -> count for ticks read back from storage; all zero for a healthy partition."""
    validation = validate_ticks(ticks.drop("seq", strict=False), symbol, start, end, rules, band)
    counts = {reason: validation.reason_counts.get(reason, 0) for reason in REASONS}
    if "seq" in ticks.columns and ticks.height:
        ordered = ticks.sort("seq")
        counts["unsorted"] = int((ordered["ts"].diff() < timedelta(0)).sum())
    return counts


CANDLE_REASONS = (
    "missing_timestamp",
    "outside_partition",
    "missing_price",
    "non_finite_price",
    "non_positive_price",
    "implausible_price",
    "misaligned_bar",
    "inconsistent_ohlc",
    "invalid_volume",
    "duplicate",
)
_OHLC = ("open", "high", "low", "close")


@dataclass(frozen=True)
class CandleValidation:
    clean: pl.DataFrame  # sorted by time, one candle per minute
    quarantine: pl.DataFrame  # the rejected rows as received, with a `reason` column
    reason_counts: dict[str, int] = field(default_factory=dict)


def inconsistent_ohlc() -> pl.Expr:
    """A candle whose low is above its open or close, or whose high is below them."""
    return (pl.col("low") > pl.min_horizontal("open", "close")) | (pl.col("high") < pl.max_horizontal("open", "close"))


def _misaligned(boundary: DayBoundary | None) -> pl.Expr:
    """A bar that does not open on its timeframe's boundary (an M5 bar at 10:03, a D1 bar of a
    broker's midnight under the UTC day boundary)."""
    if boundary is None:
        return pl.lit(False)
    expr = pl.lit(False)
    for tf in Timeframe:
        expr = pl.when(pl.col("timeframe") == tf.value).then(bar_open_expr(pl.col("ts"), tf, boundary) != pl.col("ts")).otherwise(expr)
    return expr.fill_null(False)


def candle_reason_expr(
    start: datetime, end: datetime, band: tuple[float, float] | None = None, boundary: DayBoundary | None = None
) -> pl.Expr:
    """The first reason a vendor candle is impossible, or null; duplicates are found separately."""
    prices = (*_OHLC, "vwap")  # a missing vwap is allowed (it defaults to the close), a broken one is not
    return (
        pl.when(pl.col("ts").is_null()).then(pl.lit("missing_timestamp"))
        .when((pl.col("ts") < start) | (pl.col("ts") >= end)).then(pl.lit("outside_partition"))
        .when(pl.any_horizontal(pl.col(c).is_null() for c in _OHLC)).then(pl.lit("missing_price"))
        .when(pl.any_horizontal(_finite_positive(c)[0] for c in prices)).then(pl.lit("non_finite_price"))
        .when(pl.any_horizontal(_finite_positive(c)[1] for c in prices)).then(pl.lit("non_positive_price"))
        .when(outside_band(_OHLC, band)).then(pl.lit("implausible_price"))
        .when(_misaligned(boundary)).then(pl.lit("misaligned_bar"))
        .when(inconsistent_ohlc()).then(pl.lit("inconsistent_ohlc"))
        .when(pl.col("volume").is_not_null() & ~(pl.col("volume").is_finite() & (pl.col("volume") >= 0))).then(pl.lit("invalid_volume"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def validate_candles(
    raw: pl.DataFrame, start: datetime, end: datetime, band: tuple[float, float] | None = None,
    boundary: DayBoundary | None = None,
) -> CandleValidation:
    """Split a vendor's candles (VENDOR_M1_SCHEMA, with a ``timeframe`` column where not M1)
    opening in ``[start, end)`` into clean (the first good candle of each interval) and
    quarantined: a second candle for the same interval is the source contradicting itself.
    With a ``boundary``, a bar must open on its timeframe's boundary."""
    if "timeframe" not in raw.columns:
        raw = raw.with_columns(pl.lit(Timeframe.M1.value).alias("timeframe"))
    repeated = ~pl.struct("timeframe", "ts").is_first_distinct()
    clean, quarantine, counts = _split(raw, candle_reason_expr(start, end, band, boundary), repeated=repeated)
    return CandleValidation(clean.sort("ts"), quarantine, counts)


def trading_gaps(
    ts: pl.Series, start: datetime, end: datetime, asset_class: AssetClass, max_gap: timedelta
) -> pl.DataFrame:
    """Silences longer than ``max_gap`` of open-market time within ``[start, end)``.

    Open time is counted in whole minutes of a minute grid (the minutes entirely inside the
    silence), so a closed weekend or the daily metals break is not a gap. The window edges
    count as ticks, so an open day without any tick is one long gap.
    """
    minutes = pl.datetime_range(start, end, "1m", closed="left", time_unit="ms", time_zone="UTC", eager=True)
    is_open = pl.DataFrame({"m": minutes}).with_columns(trading_open(pl.col("m"), asset_class).alias("open"))["open"]
    open_before = np.concatenate([[0], np.cumsum(is_open.to_numpy(), dtype=np.int64)])
    edges = pl.concat([pl.Series([start], dtype=TS), ts.cast(TS).sort(), pl.Series([end], dtype=TS)])
    offset_ms = (edges.dt.epoch("ms") - int(start.timestamp() * 1000)).to_numpy()
    first_full = np.clip(-(-offset_ms[:-1] // 60_000), 0, len(minutes))  # ceil to the next minute
    past_last_full = np.clip(offset_ms[1:] // 60_000, 0, len(minutes))
    open_minutes = np.maximum(open_before[past_last_full] - open_before[np.minimum(first_full, past_last_full)], 0)
    frame = pl.DataFrame({"gap_start": edges[:-1], "gap_end": edges[1:], "open_minutes": open_minutes})
    return frame.filter(pl.col("open_minutes") > max_gap.total_seconds() / 60)


def bar_coverage(opens: pl.Series, timeframes: pl.Series | str, with_end: bool = True) -> pl.Series:
    """Points in time standing for bars as :func:`trading_gaps` reads them: the start of every
    minute a bar covers and, ``with_end``, its end (a bar is data for its whole interval, so a
    missing H1 bar is a 60-minute silence while H1 bars in a row leave none). Without the end:
    the minutes a bar takes, to tell whether another source already covers one."""
    if opens.is_empty():
        return pl.Series("ts", [], dtype=TS)
    if isinstance(timeframes, str):
        timeframes = pl.Series([timeframes] * opens.len())
    minutes = timeframes.replace_strict({tf.value: tf.minutes for tf in Timeframe}, return_dtype=pl.Int64)
    frame = pl.DataFrame({"ts": opens.cast(TS), "n": minutes})
    return frame.select(
        pl.datetime_ranges("ts", pl.col("ts") + pl.duration(minutes="n"), "1m", closed="both" if with_end else "left",
                           time_unit="ms", time_zone="UTC").explode()
    ).to_series().cast(TS)


def inside_gaps(rows: pl.DataFrame, gaps: pl.DataFrame) -> pl.DataFrame:
    """Rows with ``gap_start < ts < gap_end`` for some gap of :func:`trading_gaps`.

    The bounds are the primary's own ticks (or the window's edges), so what a backup source
    adds here can never repeat a primary row: gap filling without duplicates.
    """
    if rows.is_empty() or gaps.is_empty():
        return rows.clear()
    ts = rows["ts"].cast(TS).dt.epoch("ms").to_numpy()
    starts = gaps["gap_start"].cast(TS).dt.epoch("ms").to_numpy()
    ends = gaps["gap_end"].cast(TS).dt.epoch("ms").to_numpy()
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    # gaps are disjoint: the gap a row may sit in is the last one starting before it
    index = np.searchsorted(starts, ts, side="left") - 1
    safe = np.clip(index, 0, None)
    inside = (index >= 0) & (ts > starts[safe]) & (ts < ends[safe])
    return rows.filter(pl.Series(inside))
