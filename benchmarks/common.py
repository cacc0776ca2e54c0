"""Timing helpers: best of several runs, so a stray hiccup does not decide a ratio."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date, timedelta

import polars as pl

from models.market.synthetic import SyntheticMarketConfig, generate_ticks


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def synthetic_ticks(symbol: str, target_rows: int, first_day: date = date(2024, 1, 1)) -> pl.DataFrame:
    """Consecutive synthetic days of ``symbol`` until ``target_rows`` ticks, then cut there."""
    frames, rows, day = [], 0, first_day
    while rows < target_rows:
        frame = generate_ticks(symbol, day, SyntheticMarketConfig(seed=1))
        frames.append(frame)
        rows += frame.height
        day += timedelta(days=1)
    return pl.concat(frames).head(target_rows)
