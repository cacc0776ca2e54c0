"""Training targets (historical only): forward returns, directions and a barrier label.

Everything is measured from a bar's close. The price "at" a later moment is the close of the
last bar that closed by then (as-of, backward), so closed markets and gaps need no special
case. A label whose horizon ends after ``known_until`` (the end of the data in the
warehouse) stays null; re-materializing once the later data lands fills it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

HORIZONS: dict[str, timedelta] = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "1d": timedelta(days=1)}
BARRIER_HORIZON = timedelta(hours=4)
BARRIER_WIDTH = 1.5  # barriers at +- this many horizon-scaled standard deviations
BARRIER_VOL_BARS = 100
LABEL_SCHEMA: dict[str, pl.DataType] = {
    **{f"fwd_ret_{name}": pl.Float64() for name in HORIZONS},
    **{f"direction_{name}": pl.Int8() for name in HORIZONS},
    "barrier_4h": pl.Int8(),
}
LABEL_NAMES = tuple(LABEL_SCHEMA)


def compute_labels(bars: pl.DataFrame, close_ts: pl.Series, known_until: datetime) -> pl.DataFrame:
    """Labels for each bar (sorted by ts), given each bar's close time.

    ``bars`` must reach as far into the future as the data allows; ``known_until`` is the
    moment up to which the warehouse is complete.
    """
    close = bars["close"].to_numpy().astype(np.float64)
    ends = close_ts.dt.epoch("ms").to_numpy()
    known_ms = int(known_until.timestamp() * 1000)
    out: dict[str, np.ndarray] = {}
    for name, horizon in HORIZONS.items():
        target = ends + int(horizon.total_seconds() * 1000)
        at = np.searchsorted(ends, target, side="right") - 1  # last bar closed by the target
        future = close[at]
        ret = np.where(target <= known_ms, np.log(future / close), np.nan)
        out[f"fwd_ret_{name}"] = ret
        out[f"direction_{name}"] = np.sign(ret)
    out["barrier_4h"] = _barrier(bars, ends, known_ms)
    frame = pl.DataFrame({name: out[name] for name in LABEL_NAMES})
    return frame.select(
        pl.col(name).fill_nan(None).cast(dtype) for name, dtype in LABEL_SCHEMA.items()
    )


def _barrier(bars: pl.DataFrame, ends: np.ndarray, known_ms: int) -> np.ndarray:
    """+1 if the upper barrier is touched first within the horizon, -1 the lower, 0 neither.

    Barriers sit at close * exp(+-width * sigma * sqrt(bars in horizon)), sigma the standard
    deviation of 1-bar log returns over the previous bars (known at the close). A bar that
    touches both counts as -1 (the cautious reading of an unknown intrabar order).
    """
    close = bars["close"].to_numpy().astype(np.float64)
    high, low = bars["high"].to_numpy().astype(np.float64), bars["low"].to_numpy().astype(np.float64)
    n = len(close)
    result = np.full(n, np.nan)
    if n < 2:
        return result
    log_ret = np.r_[np.nan, np.diff(np.log(close))]
    sigma = pl.Series(log_ret).fill_nan(None).rolling_std(BARRIER_VOL_BARS).fill_null(np.nan).to_numpy()
    horizon_ms = int(BARRIER_HORIZON.total_seconds() * 1000)
    last = np.searchsorted(ends, ends + horizon_ms, side="right") - 1  # last bar inside the horizon
    steps = last - np.arange(n)
    width = int(steps.max()) if n else 0
    if width < 1:
        return result
    upper = close * np.exp(BARRIER_WIDTH * sigma * np.sqrt(np.maximum(steps, 1)))
    lower = close * np.exp(-BARRIER_WIDTH * sigma * np.sqrt(np.maximum(steps, 1)))
    padded_high = np.r_[high, np.full(width, -np.inf)]
    padded_low = np.r_[low, np.full(width, np.inf)]
    ahead_high = np.lib.stride_tricks.sliding_window_view(padded_high[1:], width)[:n]
    ahead_low = np.lib.stride_tricks.sliding_window_view(padded_low[1:], width)[:n]
    inside = np.arange(width)[None, :] < steps[:, None]
    hit_up = (ahead_high >= upper[:, None]) & inside
    hit_down = (ahead_low <= lower[:, None]) & inside
    first_up = np.where(hit_up.any(axis=1), hit_up.argmax(axis=1), width)
    first_down = np.where(hit_down.any(axis=1), hit_down.argmax(axis=1), width)
    result = np.where(first_down <= first_up, np.where(first_down < width, -1.0, 0.0), 1.0)
    complete = (ends + horizon_ms <= known_ms) & ~np.isnan(sigma)
    return np.where(complete, result, np.nan)
