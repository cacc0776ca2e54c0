"""A synthetic quote market, deterministic by (seed, symbol, day), for development and demos.

What makes it realistic enough to develop on:
- trading hours per asset class (FX week, metals with the daily CME break, crypto 24/7);
- tick rates and volatility that follow the Tokyo, London and New York sessions, with a
  burst at the 08:30 New York data releases;
- volatility clustering (a log-volatility AR(1) per minute) and rare jumps;
- spreads that widen in thin hours and at the 17:00 New York rollover, in whole points;
- price levels that wander around each instrument's level, continuous across days.

Continuity without sequential state: a daily "anchor" price path (a mean-reverting random
walk seeded by (seed, symbol)) fixes the price at each UTC midnight, and each day's ticks
are a Brownian bridge between two anchors, seeded by (seed, symbol, day). Any day can be
generated alone, in any order, and always comes out the same.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import numpy as np
import polars as pl

from models.market.instruments import AssetClass, Instrument, instrument
from models.market.sessions import (
    london_session,
    minutes_after_rollover,
    new_york_session,
    tokyo_session,
    trading_open,
)
from models.market.ticks import TICK_SCHEMA, TS, empty_ticks
from models.market.timeframes import NEW_YORK

SOURCE = "synthetic"
_EPOCH = date(2000, 1, 1)
_MINUTES_PER_DAY = 1440
_HALF_LIFE_DAYS = 365.0  # mean reversion of the price level
_WEEKEND_WEIGHT = 0.3  # share of a weekday's variance that a closed weekend day carries
_JUMP_PROBABILITY = 1 / 3000  # per open minute
_SESSION_WEIGHTS = {  # base, tokyo, london, new york
    AssetClass.FX: (0.15, 0.45, 1.0, 0.9),
    AssetClass.METAL: (0.15, 0.35, 0.9, 1.1),
    AssetClass.CRYPTO: (0.5, 0.2, 0.3, 0.4),
}


@dataclass(frozen=True, slots=True)
class SyntheticMarketConfig:
    seed: int = 7
    tick_rate_scale: float = 1.0  # multiplies every instrument's ticks per day


def _ar1(innovations: np.ndarray, phi: float) -> np.ndarray:
    """x_t = phi * x_{t-1} + e_t, vectorised through polars' exponential smoother."""
    alpha = 1.0 - phi
    scaled = innovations / alpha
    scaled[0] = innovations[0]
    return pl.Series(scaled).ewm_mean(alpha=alpha, adjust=False).to_numpy()


def _symbol_key(symbol: str) -> int:
    return zlib.crc32(symbol.encode())


def _daily_variance(spec: Instrument) -> float:
    """Variance of one full trading day's log return, from the annual volatility."""
    weekly_weight = 7.0 if spec.asset_class is AssetClass.CRYPTO else 5.0 + 2 * _WEEKEND_WEIGHT
    return spec.annual_vol**2 / (52 * weekly_weight)


@lru_cache(maxsize=256)
def _log_anchor_path(seed: int, symbol: str, days: int) -> np.ndarray:
    """Log price at 00:00 UTC of each day since 2000-01-01 (``days`` + 1 values)."""
    spec = instrument(symbol)
    rng = np.random.default_rng([seed, _symbol_key(symbol), 0xA4C])
    shocks = rng.standard_normal(days + 1)
    regime = np.exp(0.35 * _ar1(rng.standard_normal(days + 1) * np.sqrt(1 - 0.97**2), 0.97))
    weekday = (np.arange(days + 1) + _EPOCH.weekday()) % 7
    if spec.asset_class is AssetClass.CRYPTO:
        weight = np.ones(days + 1)
    else:
        weight = np.where(weekday >= 5, _WEEKEND_WEIGHT, 1.0)
    steps = shocks * np.sqrt(_daily_variance(spec) * weight) * regime
    level = _ar1(steps, float(np.exp(-np.log(2) / _HALF_LIFE_DAYS)))
    return np.log(spec.base_price) + level


def anchor_price(seed: int, symbol: str, day: date) -> float:
    """The synthetic price of ``symbol`` at 00:00 UTC on ``day``."""
    offset = (day - _EPOCH).days
    if offset < 0:
        raise ValueError(f"synthetic market starts on {_EPOCH}; asked for {day}")
    return float(np.exp(_log_anchor_path(seed, symbol, offset + 1)[offset]))


def _minute_profile(spec: Instrument, day: date) -> pl.DataFrame:
    """Per UTC minute of ``day``: open flag, session activity, rollover distance, news flag."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    minutes = pl.datetime_range(start, start + timedelta(minutes=_MINUTES_PER_DAY - 1), "1m",
                                time_unit="ms", time_zone="UTC", eager=True)
    base, tokyo, london, new_york = _SESSION_WEIGHTS[spec.asset_class]
    ts = pl.col("ts")
    ny = ts.dt.convert_time_zone(NEW_YORK)
    ny_minute = ny.dt.hour().cast(pl.Int32) * 60 + ny.dt.minute().cast(pl.Int32)
    activity = (
        base
        + tokyo * tokyo_session(ts).cast(pl.Float64)
        + london * london_session(ts).cast(pl.Float64)
        + new_york * new_york_session(ts).cast(pl.Float64)
    )
    if spec.asset_class is AssetClass.CRYPTO:
        activity = activity * pl.when(ny.dt.weekday() >= 6).then(0.6).otherwise(1.0)
    return pl.DataFrame({"ts": minutes}).select(
        "ts",
        trading_open(ts, spec.asset_class).alias("open"),
        activity.alias("activity"),
        minutes_after_rollover(ts).alias("after_rollover"),
        (ny_minute.is_between(8 * 60 + 30, 8 * 60 + 33, closed="left") & (ny.dt.weekday() <= 5)).alias("news"),
    )


@lru_cache(maxsize=8)
def _reference_activity(asset_class: AssetClass) -> float:
    """Mean activity per minute of an ordinary mid-week day: the tick-rate normaliser."""
    spec = Instrument("REF", asset_class, 1.0, 5, 1e-4, 1.0, 0.1, 1)
    return float(_minute_profile(spec, date(2024, 1, 17))["activity"].mean())


def generate_ticks(symbol: str, day: date, config: SyntheticMarketConfig = SyntheticMarketConfig()) -> pl.DataFrame:
    """All quote ticks of ``symbol`` on the UTC day ``day``, sorted by time."""
    spec = instrument(symbol)
    profile = _minute_profile(spec, day)
    is_open = profile["open"].to_numpy()
    if not is_open.any():
        return empty_ticks()
    rng = np.random.default_rng([config.seed, _symbol_key(spec.symbol), day.toordinal()])
    activity = profile["activity"].to_numpy()
    news = profile["news"].to_numpy()
    after_rollover = profile["after_rollover"].to_numpy()

    # Volatility clustering: log-volatility follows an AR(1) from minute to minute.
    log_vol = _ar1(rng.standard_normal(_MINUTES_PER_DAY) * 0.45 * np.sqrt(1 - 0.985**2), 0.985)
    burst = np.where(news, 3.0, 1.0)
    rate = activity * np.exp(0.5 * log_vol) * burst
    expected = spec.ticks_per_day * config.tick_rate_scale * rate / (_MINUTES_PER_DAY * _reference_activity(spec.asset_class))
    counts = np.where(is_open, rng.poisson(expected), 0)
    n = int(counts.sum())
    if n == 0:
        return empty_ticks()

    # Tick times: uniform within their minute, sorted (equal milliseconds do happen).
    minute_of_tick = np.repeat(np.arange(_MINUTES_PER_DAY), counts)
    day_start_ms = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    ts_ms = np.sort(minute_of_tick * 60_000 + rng.integers(0, 60_000, n)) + day_start_ms
    minute_of_tick = (ts_ms - day_start_ms) // 60_000

    # Minute variance shares the day's variance by activity and volatility regime.
    minute_var = np.where(is_open, activity**1.2 * np.exp(2 * log_vol) * burst**2, 0.0)
    log_start = np.log(anchor_price(config.seed, spec.symbol, day))
    log_end = np.log(anchor_price(config.seed, spec.symbol, day + timedelta(days=1)))
    minute_var *= _daily_variance(spec) / minute_var.sum()
    tick_var = (minute_var / np.maximum(counts, 1))[minute_of_tick]
    first_of_minute = np.r_[True, minute_of_tick[1:] != minute_of_tick[:-1]]
    jumps = first_of_minute & (rng.random(n) < _JUMP_PROBABILITY)
    jump_var = np.where(jumps, 64 * minute_var[minute_of_tick], 0.0)
    steps = rng.standard_normal(n) * np.sqrt(tick_var + jump_var)
    path = np.cumsum(steps)
    cum_var = np.cumsum(tick_var + jump_var)
    bridged = path - cum_var / cum_var[-1] * (path[-1] - (log_end - log_start))
    mid = np.exp(log_start + bridged)

    # Spreads in whole points: wider in thin hours, at the rollover and with volatility.
    spread_pips = spec.spread_pips * np.sqrt(1.0 / np.maximum(activity, 0.15)) * np.exp(0.3 * log_vol)
    if spec.asset_class is not AssetClass.CRYPTO:
        spread_pips *= np.where(after_rollover < 5, 6.0, np.where(after_rollover < 30, 2.5, 1.0))
    noise = rng.lognormal(0.0, 0.25, n)
    points = np.maximum(1, np.rint(spread_pips[minute_of_tick] * noise * spec.pip / spec.point))
    bid = np.round(mid - points * spec.point / 2, spec.digits)
    ask = np.round(bid + points * spec.point, spec.digits)

    size_scale = {AssetClass.FX: 1.0, AssetClass.METAL: 10.0, AssetClass.CRYPTO: 20_000.0 / spec.base_price}
    sizes = np.round(rng.lognormal(0.0, 0.7, (2, n)) * size_scale[spec.asset_class], 2) + 0.01

    quotes = pl.DataFrame({"ts": ts_ms, "bid": bid, "ask": ask, "bid_size": sizes[0], "ask_size": sizes[1]})
    return quotes.select(
        pl.lit(spec.symbol).alias("symbol"),
        pl.col("ts").cast(TS),
        "bid",
        "ask",
        "bid_size",
        "ask_size",
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.lit(None, dtype=pl.Float64).alias("size"),
        pl.lit(None, dtype=pl.Int64).alias("vendor_seq"),
        pl.lit(SOURCE).alias("source"),
    ).cast(TICK_SCHEMA)
