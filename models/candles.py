"""Ticks -> OHLCV candles at every timeframe: pure, vectorised polars.

Ticks become M1 bars in one pass; every longer timeframe is rolled up from M1 bars, which is
exact because every bar boundary is a whole minute. The roll-up works on finished bars
(it rebuilds the sums behind ``vwap`` and ``spread_mean`` from their counts), so the same
function also extends bars already stored in the warehouse.

Columns: OHLC of the reference price (quote mid, or trade price for trades), the last bid and
ask, traded ``volume`` (0 for quote-only data), ``tick_count`` (all ticks), ``quote_count``
(ticks with a two-sided quote), spread mean/max over quotes, ``vwap`` (volume-weighted over
trades; the tick-weighted mean price where nothing traded, as for FX quotes) and ``source``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import polars as pl

from models.ticks import TS, reference_price
from models.timeframes import ALL_TIMEFRAMES, DayBoundary, Timeframe, bar_open_at, bar_open_expr

BAR_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": TS,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "bid_close": pl.Float64(),
    "ask_close": pl.Float64(),
    "volume": pl.Float64(),
    "tick_count": pl.UInt32(),
    "quote_count": pl.UInt32(),
    "spread_mean": pl.Float64(),
    "spread_max": pl.Float64(),
    "vwap": pl.Float64(),
    "source": pl.String(),
}

_MINUTE_MS = 60_000


def sort_ticks(ticks: pl.DataFrame) -> pl.DataFrame:
    """Time order, keeping arrival order among equal timestamps (a stable sort)."""
    if ticks["ts"].is_sorted():
        return ticks
    return ticks.sort("ts", maintain_order=True)


def _source_agg(frame: pl.DataFrame) -> pl.Expr:
    """One source name per bar; several sources join as 'a+b' (sorted, unique)."""
    if frame["source"].drop_nulls().n_unique() <= 1:
        return pl.col("source").first()
    return pl.col("source").str.split("+").list.explode(keep_nulls=False, empty_as_null=False).unique().sort().str.join("+")


def _finish(grouped: pl.DataFrame, tf: Timeframe) -> pl.DataFrame:
    return grouped.select(
        "symbol",
        pl.lit(tf.value).alias("timeframe"),
        pl.col("ts").cast(TS),
        "open",
        "high",
        "low",
        "close",
        "bid_close",
        "ask_close",
        "volume",
        pl.col("tick_count").cast(pl.UInt32),
        pl.col("quote_count").cast(pl.UInt32),
        pl.when(pl.col("quote_count") > 0).then(pl.col("spread_sum") / pl.col("quote_count")).alias("spread_mean"),
        "spread_max",
        pl.when(pl.col("volume") > 0)
        .then(pl.col("pv_sum") / pl.col("volume"))
        .otherwise(pl.col("ref_sum") / pl.col("tick_count"))
        .alias("vwap"),
        "source",
    )


def ticks_to_m1(ticks: pl.DataFrame) -> pl.DataFrame:
    """M1 bars of ticks in :data:`models.ticks.TICK_SCHEMA` (any symbols, any order)."""
    ticks = sort_ticks(ticks)
    ref = reference_price()
    spread = pl.col("ask") - pl.col("bid")
    minute = (pl.col("ts").dt.epoch("ms") // _MINUTE_MS * _MINUTE_MS).cast(TS).alias("ts")
    grouped = (
        ticks.lazy()
        .with_columns(ref.alias("ref"), spread.alias("spread"))
        .group_by("symbol", minute, maintain_order=True)
        .agg(
            pl.col("ref").first().alias("open"),
            pl.col("ref").max().alias("high"),
            pl.col("ref").min().alias("low"),
            pl.col("ref").last().alias("close"),
            pl.col("bid").drop_nulls().last().alias("bid_close"),
            pl.col("ask").drop_nulls().last().alias("ask_close"),
            pl.col("size").sum().alias("volume"),
            pl.len().alias("tick_count"),
            pl.col("spread").count().alias("quote_count"),
            pl.col("spread").sum().alias("spread_sum"),
            pl.col("spread").max().alias("spread_max"),
            (pl.col("price") * pl.col("size")).sum().alias("pv_sum"),
            pl.col("ref").sum().alias("ref_sum"),
            _source_agg(ticks).alias("source"),
        )
        .collect()
    )
    return _finish(grouped, Timeframe.M1).sort("symbol", "ts", maintain_order=True)


def rollup_bars(bars: pl.DataFrame, tf: Timeframe, boundary: DayBoundary = DayBoundary.UTC) -> pl.DataFrame:
    """Bars of ``tf`` from finer bars (sorted by symbol and ts), e.g. M1 -> H4."""
    volume_positive = pl.col("volume") > 0
    grouped = (
        bars.lazy()
        .group_by("symbol", bar_open_expr(pl.col("ts"), tf, boundary).alias("ts"), maintain_order=True)
        .agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("bid_close").drop_nulls().last(),
            pl.col("ask_close").drop_nulls().last(),
            pl.col("volume").sum(),
            pl.col("tick_count").cast(pl.UInt64).sum(),
            pl.col("quote_count").cast(pl.UInt64).sum(),
            (pl.col("spread_mean") * pl.col("quote_count")).sum().alias("spread_sum"),
            pl.col("spread_max").max(),
            pl.when(volume_positive).then(pl.col("vwap") * pl.col("volume")).sum().alias("pv_sum"),
            pl.when(volume_positive).then(0.0).otherwise(pl.col("vwap") * pl.col("tick_count")).sum().alias("ref_sum"),
            _source_agg(bars).alias("source"),
        )
        .collect()
    )
    return _finish(grouped, tf).sort("symbol", "ts", maintain_order=True)


def aggregate_ticks(
    ticks: pl.DataFrame,
    timeframes: Iterable[Timeframe] = ALL_TIMEFRAMES,
    boundary: DayBoundary = DayBoundary.UTC,
) -> pl.DataFrame:
    """Bars at each requested timeframe, stacked, ordered by timeframe, symbol and ts."""
    m1 = ticks_to_m1(ticks)
    frames = [m1 if tf is Timeframe.M1 else rollup_bars(m1, tf, boundary) for tf in timeframes]
    if not frames:
        return pl.DataFrame(schema=BAR_SCHEMA)
    return pl.concat(frames, how="vertical")


def carried_bar_opens(
    start: datetime, timeframes: Iterable[Timeframe], boundary: DayBoundary
) -> dict[Timeframe, datetime]:
    """Per timeframe, the open of the bar that began before ``start`` and runs into it."""
    opens = {tf: bar_open_at(start, tf, boundary) for tf in timeframes}
    return {tf: opened for tf, opened in opens.items() if opened < start}


def window_lookback_start(start: datetime, timeframes: Iterable[Timeframe], boundary: DayBoundary) -> datetime:
    """Earliest tick needed to build every bar that overlaps a window starting at ``start``."""
    return min([start, *carried_bar_opens(start, timeframes, boundary).values()])


def bars_for_window(
    ticks: pl.DataFrame,
    start: datetime,
    timeframes: Iterable[Timeframe] = ALL_TIMEFRAMES,
    boundary: DayBoundary = DayBoundary.UTC,
) -> pl.DataFrame:
    """Bars overlapping a window that starts at ``start``, built from ticks since
    :func:`window_lookback_start` up to the window's end.

    A bar that runs past the window end holds the data up to it, as a live feed would; the
    window that contains the bar's end completes it. Bars that ended before ``start`` are
    left out: earlier windows own them.
    """
    timeframes = tuple(timeframes)
    bars = aggregate_ticks(ticks, timeframes, boundary)
    carried = carried_bar_opens(start, timeframes, boundary)
    is_carried = pl.any_horizontal(
        pl.lit(False), *((pl.col("timeframe") == tf.value) & (pl.col("ts") == opened) for tf, opened in carried.items())
    )
    return bars.filter((pl.col("ts") >= start) | is_carried)
