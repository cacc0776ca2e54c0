"""`ml_features`-shaped frames with a planted, known signal: for tests and benchmarks of the
learning code, where the real features of a random-walk market would have nothing to learn.

Every registered feature is a column (standard normal noise); the labels depend on three of
them, with a strength set by ``signal`` (0: pure noise). FX-like symbols close from Friday
21:00 to Sunday 21:00 UTC; crypto (BTC..., ETH...) trades through the weekend. The first
``cold`` bars of each symbol are not warm and the labels of the bars whose horizon passes
the end stay null, as in the real table.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from models.features.labels import HORIZONS, LABEL_SCHEMA
from models.features.registry import FEATURE_NAMES
from models.market.ticks import TS
from models.market.timeframes import Timeframe

SIGNAL_FEATURES = ("rsi_14", "macd", "bb_position_20")


def _open(ts: np.ndarray, crypto: bool) -> np.ndarray:
    if crypto:
        return np.ones(len(ts), dtype=bool)
    seconds = (ts // 1000).astype(np.int64)
    weekday = ((seconds // 86_400) + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    hour = (seconds % 86_400) // 3600
    closed = ((weekday == 4) & (hour >= 21)) | (weekday == 5) | ((weekday == 6) & (hour < 21))
    return ~closed


def planted_features(
    symbols: list[str],
    start: date,
    days: int,
    timeframe: Timeframe = Timeframe.M5,
    feature_set: str = "planted",
    signal: float = 1.0,
    seed: int = 0,
    cold: int = 20,
) -> pl.DataFrame:
    """Rows of every symbol, sorted by (symbol, ts), in the columns of `ml_features`."""
    rng = np.random.default_rng(seed)
    step = timeframe.minutes * 60_000
    first = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp() * 1000)
    grid = np.arange(first, first + days * 86_400_000, step, dtype=np.int64)
    end_ms = int(grid[-1]) + step
    frames = []
    for symbol in symbols:
        ts = grid[_open(grid, symbol.upper().startswith(("BTC", "ETH")))]
        n = len(ts)
        features = rng.standard_normal((n, len(FEATURE_NAMES)))
        column = {name: i for i, name in enumerate(FEATURE_NAMES)}
        a, b, c = (features[:, column[name]] for name in SIGNAL_FEATURES)
        score = signal * (0.8 * a + 0.6 * np.tanh(b * c))
        close_ts = ts + step
        labels: dict[str, np.ndarray] = {}
        for name, horizon in HORIZONS.items():
            scale = np.sqrt(horizon.total_seconds() / 3600)
            ret = 0.001 * scale * (score + rng.standard_normal(n))
            ret[close_ts + int(horizon.total_seconds() * 1000) > end_ms] = np.nan
            labels[f"fwd_ret_{name}"] = ret
            labels[f"direction_{name}"] = np.sign(ret)
        r4 = labels["fwd_ret_4h"]
        width = 0.5 * np.nanstd(r4)
        labels["barrier_4h"] = np.where(np.isnan(r4), np.nan, np.where(r4 > width, 1.0, np.where(r4 < -width, -1.0, 0.0)))
        frame = pl.DataFrame({
            "symbol": symbol, "timeframe": timeframe.value,
            "ts": pl.Series(ts).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            "close_ts": pl.Series(close_ts).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
            "feature_set": feature_set,
            "warm": pl.Series((np.arange(n) >= cold).astype(np.uint8)),
            **{name: features[:, i] for i, name in enumerate(FEATURE_NAMES)},
            **{name: pl.Series(values).fill_nan(None).cast(LABEL_SCHEMA[name]) for name, values in labels.items()},
        })
        frames.append(frame)
    return pl.concat(frames).with_columns(pl.col("ts", "close_ts").cast(TS))


def day_range(first: date, days: int) -> tuple[datetime, datetime]:
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    return start, start + timedelta(days=days)
