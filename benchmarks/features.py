"""Features: all ~150 for 1M bars of one symbol, the live vector's latency, and a pandas
implementation of the same trend/momentum/volatility indicators in the same run."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import polars as pl

from benchmarks.common import best_of
from models.market.candles import BAR_SCHEMA
from models.features import compute as engine
from models.features.external import UTC_MS, ExternalData
from models.features.online import RollingFeatures
from models.features.registry import FEATURE_NAMES, WARMUP_BARS
from models.market.timeframes import Timeframe


def synthetic_bars(n: int, seed: int = 1) -> pl.DataFrame:
    """Round-the-clock M1 bars from a random walk: enough realism for timing."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 4e-4, n)))
    open_ = np.r_[close[0], close[:-1]]
    spread = np.abs(rng.normal(0, 3e-4, n)) * close
    high, low = np.maximum(open_, close) + spread, np.minimum(open_, close) - spread
    frame = pl.DataFrame({
        "symbol": "BENCH", "timeframe": "M1",
        "ts": pl.Series(np.arange(n, dtype=np.int64) * 60_000 + int(datetime(2020, 1, 1, tzinfo=UTC).timestamp() * 1000)),
        "open": open_, "high": high, "low": low, "close": close, "bid_close": close - 1e-3, "ask_close": close + 1e-3,
        "volume": 0.0, "tick_count": rng.integers(5, 200, n), "quote_count": 0, "spread_mean": 2e-3 + rng.random(n) * 1e-3,
        "spread_max": 5e-3, "vwap": (high + low + close) / 3, "source": "bench",
    })
    return frame.with_columns(pl.col("ts").cast(BAR_SCHEMA["ts"])).cast(BAR_SCHEMA)  # type: ignore[arg-type]


def pandas_indicators(df: pd.DataFrame) -> pd.DataFrame:
    """The trend, momentum and volatility families written the straightforward pandas way."""
    c, h, l, o = df["close"], df["high"], df["low"], df["open"]
    out = {}
    for n in (10, 20, 50, 200):
        out[f"sma_ratio_{n}"] = c / c.rolling(n).mean() - 1
    for n in (10, 20, 50):
        out[f"ema_ratio_{n}"] = c / c.ewm(span=n, adjust=False).mean() - 1
    weights = np.arange(1, 21)
    out["wma_ratio_20"] = c / c.rolling(20).apply(lambda x: np.dot(x, weights) / weights.sum(), raw=True) - 1
    ema12, ema26 = c.ewm(span=12, adjust=False).mean(), c.ewm(span=26, adjust=False).mean()
    macd = ema12 - ema26
    signal = macd.ewm(span=9, adjust=False).mean()
    out["macd"], out["macd_signal"], out["macd_hist"] = macd / c, signal / c, (macd - signal) / c
    prev = c.shift()
    tr = pd.concat([h - l, (h - prev).abs(), (l - prev).abs()], axis=1).max(axis=1)
    for n in (7, 14, 28):
        out[f"natr_{n}"] = tr.ewm(alpha=1 / n, adjust=False).mean() / c
    delta = c.diff()
    for n in (7, 14, 28):
        gain = delta.clip(lower=0).ewm(alpha=1 / n, adjust=False).mean()
        loss = (-delta.clip(upper=0)).ewm(alpha=1 / n, adjust=False).mean()
        out[f"rsi_{n}"] = gain / (gain + loss)
    lowest, highest = l.rolling(14).min(), h.rolling(14).max()
    k = ((c - lowest) / (highest - lowest)).rolling(3).mean()
    out["stoch_k"], out["stoch_d"] = k, k.rolling(3).mean()
    tp = (h + l + c) / 3
    out["cci_20"] = (tp - tp.rolling(20).mean()) / (0.015 * tp.rolling(20).apply(lambda x: np.abs(x - x.mean()).mean(), raw=True)) / 100
    out["willr_14"] = (highest - c) / (highest - lowest) * -1
    for n in (5, 10, 20):
        out[f"roc_{n}"] = c / c.shift(n) - 1
    mid, sd = c.rolling(20).mean(), c.rolling(20).std(ddof=0)
    out["bb_position_20"], out["bb_width_20"] = (c - (mid - 2 * sd)) / (4 * sd), 4 * sd / mid
    for n in (20, 55):
        hh, ll = h.rolling(n).max(), l.rolling(n).min()
        out[f"donchian_position_{n}"], out[f"donchian_width_{n}"] = (c - ll) / (hh - ll), (hh - ll) / c
    log_ret = np.log(c).diff()
    for n in (10, 30, 60, 120):
        out[f"realized_vol_{n}"] = log_ret.rolling(n).std()
    out["bop"] = (c - o) / (h - l)
    return pd.DataFrame(out)


def synthetic_external(first: datetime, days: int, seed: int = 2) -> ExternalData:
    """A daily value for every external feature and an event every 7 hours over ``days``."""
    rng = np.random.default_rng(seed)
    names = [n for n in engine.EXTERNAL_FEATURES if not n.startswith("event_")]
    known = [first + timedelta(days=d) for d in range(days) for _ in names]
    values = pl.DataFrame({"known_at": known, "name": names * days, "value": rng.normal(size=len(known))})
    releases = [first + timedelta(hours=7 * i) for i in range(days * 24 // 7)]
    events = pl.DataFrame({"ts": releases, "known_at": [t - timedelta(days=3) for t in releases],
                           "surprise": rng.normal(size=len(releases))})
    return ExternalData(values=values.with_columns(pl.col("known_at").cast(UTC_MS)),
                        events=events.with_columns(pl.col("ts", "known_at").cast(UTC_MS)))


def _live_latencies(bars: pl.DataFrame, updates: range, external: ExternalData | None) -> tuple[float, float]:
    """p50 and p99 (ms) of one update each, from a window seeded with the bars before."""
    live = RollingFeatures(Timeframe.M1)
    live.seed(bars.slice(updates.start - WARMUP_BARS, WARMUP_BARS))
    latencies = []
    for i in updates:
        started = time.perf_counter()
        live.update(bars.slice(i, 1), external)
        latencies.append(time.perf_counter() - started)
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    return p50, p99


def bench_features(quick: bool = False) -> dict[str, float]:
    n = 200_000 if quick else 1_000_000
    bars = synthetic_bars(n)
    full_s = best_of(lambda: engine.compute_features(bars, Timeframe.M1), repeat=2)

    frame = bars.select("open", "high", "low", "close").to_pandas()
    pandas_s = best_of(lambda: pandas_indicators(frame), repeat=1)
    same = engine.BarArrays(engine.BarArrays.columns_of(bars))

    def families() -> tuple:
        with np.errstate(**engine.QUIET):
            return engine._trend(same), engine._momentum(same), engine._volatility(same)

    ours_s = best_of(families, repeat=2)
    pandas_count = pandas_indicators(frame.head(500)).shape[1]
    ours_count = sum(len(f(same)) for f in (engine._trend, engine._momentum, engine._volatility))

    # Live: the incremental engine, without and with external data (a year of it), and the
    # baseline of recomputing the window every bar.
    updates = range(WARMUP_BARS, WARMUP_BARS + (300 if quick else 3000))  # p99: the 30th slowest
    p50, p99 = _live_latencies(bars, updates, None)
    external = synthetic_external(bars["ts"][0] - timedelta(days=365), 400)
    ext_p50, ext_p99 = _live_latencies(bars, updates, external)
    window = []
    for i in updates[:100]:
        history = bars.slice(i - WARMUP_BARS + 1, WARMUP_BARS)
        started = time.perf_counter()
        engine.compute_features(history, Timeframe.M1, tail=1)
        window.append(time.perf_counter() - started)
    window_p50, window_p99 = (float(np.percentile(window, q)) * 1000 for q in (50, 99))

    print(f"features: {len(FEATURE_NAMES)} features x {n:,} bars")
    print(f"  all features, batch              {full_s:8.2f} s  ({n / full_s / 1e3:,.0f} k bars/s)")
    print(f"  trend+momentum+volatility        {ours_s:8.2f} s  ({ours_count} features, TA-Lib)")
    print(f"  pandas baseline, same families   {pandas_s:8.2f} s  ({pandas_count} features)")
    per_feature = (pandas_s / pandas_count) / (ours_s / ours_count)
    print(f"  speed-up per feature vs pandas   {per_feature:8.1f} x")
    print(f"  live vector, incremental         p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    print(f"  live vector, with external data  p50 {ext_p50:6.2f} ms   p99 {ext_p99:6.2f} ms")
    print(f"  live baseline: recompute window  p50 {window_p50:6.2f} ms   p99 {window_p99:6.2f} ms  ({window_p50 / p50:.1f}x the median)")
    return {
        "bars": n, "features": len(FEATURE_NAMES), "batch_seconds": round(full_s, 3),
        "families_seconds": round(ours_s, 3), "families_features": ours_count,
        "pandas_seconds": round(pandas_s, 3), "pandas_features": pandas_count,
        "speedup_per_feature_vs_pandas": round(per_feature, 1), "live_p50_ms": round(p50, 3), "live_p99_ms": round(p99, 3),
        "live_external_p50_ms": round(ext_p50, 3), "live_external_p99_ms": round(ext_p99, 3),
        "window_recompute_p50_ms": round(window_p50, 3), "window_recompute_p99_ms": round(window_p99, 3),
    }
