"""Ticks -> all 8 timeframes: tradeforge's polars path vs straightforward pandas resampling.

Both compute, per timeframe, OHLC of the mid, last bid/ask, spread mean/max, tick count and
mean price, and drop empty intervals; pandas resamples the ticks once per timeframe (its
idiomatic route), tradeforge builds M1 once and rolls it up.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl

from benchmarks.common import best_of, synthetic_ticks
from models.market.candles import aggregate_ticks
from models.market.timeframes import ALL_TIMEFRAMES, DayBoundary, bar_open_expr

_PANDAS_RULES = {"M1": "1min", "M5": "5min", "M15": "15min", "M30": "30min", "H1": "1h", "H4": "4h", "D1": "1D", "W1": "7D"}


def pandas_candles(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    frame = frame.assign(mid=(frame["bid"] + frame["ask"]) / 2, spread=frame["ask"] - frame["bid"])
    out = {}
    for tf, rule in _PANDAS_RULES.items():
        resampled = frame.resample(rule, label="left", closed="left", origin="epoch" if tf != "W1" else "1970-01-04")
        bars = resampled["mid"].ohlc()
        bars["bid_close"] = resampled["bid"].last()
        bars["ask_close"] = resampled["ask"].last()
        bars["spread_mean"] = resampled["spread"].mean()
        bars["spread_max"] = resampled["spread"].max()
        bars["tick_count"] = resampled["mid"].count()
        bars["vwap"] = resampled["mid"].mean()
        out[tf] = bars[bars["tick_count"] > 0]
    return out


_POLARS_AGG = [pl.col("open").first(), pl.col("high").max(), pl.col("low").min(), pl.col("close").last(),
               pl.col("bid_close").drop_nulls().last(), pl.col("ask_close").drop_nulls().last(),
               pl.col("volume").sum(), pl.col("pv_sum").sum(), pl.col("ref_sum").sum(), pl.col("tick_count").sum(),
               pl.col("quote_count").sum(), pl.col("spread_sum").sum(), pl.col("spread_max").max(), pl.col("source").first()]


def polars_cascade(ticks: pl.DataFrame, boundary: DayBoundary = DayBoundary.UTC) -> dict[str, pl.DataFrame]:
    """The same columns as tradeforge's kernel with polars' own grouping: `group_by_dynamic`
    from ticks to M1, then each timeframe from the one below (boundary-aligned ones by key)."""
    quote = pl.col("bid").is_not_null() & pl.col("ask").is_not_null()
    ref = pl.coalesce(pl.col("price"), (pl.col("bid") + pl.col("ask")) * 0.5)
    traded = pl.col("price").is_not_null() & pl.col("size").is_not_null()
    spread = pl.col("ask") - pl.col("bid")
    rows = ticks.lazy().select(
        "symbol", "ts", ref.alias("open"), ref.alias("high"), ref.alias("low"), ref.alias("close"),
        pl.col("bid").alias("bid_close"), pl.col("ask").alias("ask_close"),
        pl.when(traded).then(pl.col("size")).otherwise(0.0).alias("volume"),
        pl.when(traded).then(pl.col("price") * pl.col("size")).otherwise(0.0).alias("pv_sum"), ref.alias("ref_sum"),
        pl.lit(1, pl.UInt32).alias("tick_count"), quote.cast(pl.UInt32).alias("quote_count"),
        pl.when(quote).then(spread).otherwise(0.0).alias("spread_sum"), pl.when(quote).then(spread).alias("spread_max"),
        "source")
    level = rows.group_by_dynamic("ts", every="1m", group_by="symbol").agg(_POLARS_AGG).collect()
    out = {"M1": level}
    for tf in ALL_TIMEFRAMES[1:]:
        if tf.value in ("H4", "D1", "W1") and (boundary is not DayBoundary.UTC or tf.value == "W1"):
            keyed = level.lazy().with_columns(bar_open_expr(pl.col("ts"), tf, boundary).alias("ts"))
            level = keyed.group_by("symbol", "ts", maintain_order=True).agg(_POLARS_AGG).collect()
        else:
            level = level.lazy().group_by_dynamic("ts", every=tf.every, group_by="symbol").agg(_POLARS_AGG).collect()
        out[tf.value] = level
    return out


def plain_polars_cascade(ticks: pl.DataFrame) -> list[pl.DataFrame]:
    """OHLC and a count only: the "plain group_by_dynamic cascade" once measured against the
    kernel (it computes far fewer columns)."""
    level = ticks.lazy().with_columns(mid=(pl.col("bid") + pl.col("ask")) / 2).group_by_dynamic("ts", every="1m").agg(
        pl.col("mid").first().alias("open"), pl.col("mid").max().alias("high"), pl.col("mid").min().alias("low"),
        pl.col("mid").last().alias("close"), pl.len().alias("n")).collect()
    out = [level]
    for tf in ALL_TIMEFRAMES[1:]:
        level = level.lazy().group_by_dynamic("ts", every=tf.every).agg(
            pl.col("open").first(), pl.col("high").max(), pl.col("low").min(), pl.col("close").last(), pl.col("n").sum()).collect()
        out.append(level)
    return out


def bench_candles(quick: bool = False) -> dict[str, float]:
    rows = 1_000_000 if quick else 5_000_000
    ticks = synthetic_ticks("EURUSD", rows)
    indexed = ticks.select("ts", "bid", "ask").to_pandas().set_index("ts")

    ours = aggregate_ticks(ticks, ALL_TIMEFRAMES, DayBoundary.UTC)
    theirs = pandas_candles(indexed)
    # Same numbers from both, or the ratio means nothing.
    for tf in ("M1", "H1", "D1"):
        mine = ours.filter(pl.col("timeframe") == tf)
        assert mine.height == len(theirs[tf]), tf
        assert np.allclose(mine["close"].to_numpy(), theirs[tf]["close"].to_numpy(), rtol=0, atol=1e-12), tf
        assert (mine["tick_count"].to_numpy() == theirs[tf]["tick_count"].to_numpy()).all(), tf
    assert ours.filter(pl.col("timeframe") == "W1").height == len(theirs["W1"])

    cascade = polars_cascade(ticks)  # the peer computes the same numbers
    for tf in ("M1", "H1", "D1"):
        mine = ours.filter(pl.col("timeframe") == tf)
        assert np.array_equal(mine["close"].to_numpy(), cascade[tf]["close"].to_numpy()), tf
        assert np.array_equal(mine["tick_count"].to_numpy(), cascade[tf]["tick_count"].to_numpy()), tf
    polars_s = best_of(lambda: aggregate_ticks(ticks, ALL_TIMEFRAMES, DayBoundary.UTC))
    cascade_s = best_of(lambda: polars_cascade(ticks))
    plain_s = best_of(lambda: plain_polars_cascade(ticks))
    polars_ny_s = best_of(lambda: aggregate_ticks(ticks, ALL_TIMEFRAMES, DayBoundary.NEW_YORK_17))
    pandas_s = best_of(lambda: pandas_candles(indexed), repeat=2)
    result = {
        "ticks": rows,
        "bars": ours.height,
        "polars_seconds": round(polars_s, 4),
        "polars_ticks_per_second": round(rows / polars_s),
        "polars_ny17_ticks_per_second": round(rows / polars_ny_s),
        "pandas_seconds": round(pandas_s, 4),
        "pandas_ticks_per_second": round(rows / pandas_s),
        "speedup_vs_pandas": round(pandas_s / polars_s, 1),
        "polars_cascade_seconds": round(cascade_s, 4),
        "polars_cascade_vs_kernel": round(cascade_s / polars_s, 2),
        "plain_polars_cascade_seconds": round(plain_s, 4),
    }
    print(f"candles: {rows:,} ticks -> 8 timeframes ({ours.height:,} bars)")
    print(f"  tradeforge kernel (UTC)     {polars_s:8.3f} s  {rows / polars_s / 1e6:8.2f} M ticks/s")
    print(f"  tradeforge kernel (NY 17h)  {polars_ny_s:8.3f} s  {rows / polars_ny_s / 1e6:8.2f} M ticks/s")
    print(f"  pandas resample baseline    {pandas_s:8.3f} s  {rows / pandas_s / 1e6:8.2f} M ticks/s")
    print(f"  speed-up vs pandas          {pandas_s / polars_s:8.1f} x")
    print(f"  polars group_by_dynamic cascade, same columns {cascade_s:8.3f} s ({cascade_s / polars_s:.1f}x the kernel's time)")
    print(f"  polars cascade of OHLC + count only           {plain_s:8.3f} s ({plain_s / polars_s:.1f}x, far fewer columns)")
    return result
