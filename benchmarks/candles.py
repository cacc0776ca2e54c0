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
from models.market.timeframes import ALL_TIMEFRAMES, DayBoundary

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

    polars_s = best_of(lambda: aggregate_ticks(ticks, ALL_TIMEFRAMES, DayBoundary.UTC))
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
    }
    print(f"candles: {rows:,} ticks -> 8 timeframes ({ours.height:,} bars)")
    print(f"  tradeforge (polars, UTC)    {polars_s:8.3f} s  {rows / polars_s / 1e6:8.2f} M ticks/s")
    print(f"  tradeforge (polars, NY 17h) {polars_ny_s:8.3f} s  {rows / polars_ny_s / 1e6:8.2f} M ticks/s")
    print(f"  pandas resample baseline    {pandas_s:8.3f} s  {rows / pandas_s / 1e6:8.2f} M ticks/s")
    print(f"  speed-up vs pandas          {pandas_s / polars_s:8.1f} x")
    return result
