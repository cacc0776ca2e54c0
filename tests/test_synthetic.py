"""The synthetic market: deterministic, and shaped like the real one where it matters."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from models.market.instruments import AssetClass, instrument
from models.market.sessions import trading_open
from models.market.synthetic import SyntheticMarketConfig, anchor_price, generate_ticks

NY = "America/New_York"


def test_same_seed_same_ticks_any_order():
    a = generate_ticks("EURUSD", date(2024, 3, 5))
    generate_ticks("EURUSD", date(2024, 3, 4))  # generating another day first changes nothing
    assert generate_ticks("EURUSD", date(2024, 3, 5)).equals(a)
    other = generate_ticks("EURUSD", date(2024, 3, 5), SyntheticMarketConfig(seed=8))
    assert not other.equals(a)
    assert not generate_ticks("GBPUSD", date(2024, 3, 5)).equals(a)


def test_fx_is_closed_on_the_weekend_dst_aware():
    saturday = generate_ticks("EURUSD", date(2024, 3, 9))
    assert saturday.is_empty()
    # Sunday 2024-03-10 is the first day of US daylight time: the week opens at 21:00 UTC.
    sunday = generate_ticks("EURUSD", date(2024, 3, 10))
    assert sunday["ts"].min() >= datetime(2024, 3, 10, 21, tzinfo=UTC)
    assert sunday.height > 100
    # Friday 2024-03-08 is still winter time: the week closes at 22:00 UTC.
    friday = generate_ticks("EURUSD", date(2024, 3, 8))
    assert friday["ts"].max() < datetime(2024, 3, 8, 22, tzinfo=UTC)
    assert friday["ts"].max() > datetime(2024, 3, 8, 21, 30, tzinfo=UTC)


def test_gold_pauses_daily_and_crypto_never_does():
    gold = generate_ticks("XAUUSD", date(2024, 3, 6))
    hours_ny = gold["ts"].dt.convert_time_zone(NY).dt.hour()
    assert (hours_ny == 17).sum() == 0 and (hours_ny == 18).sum() > 0
    btc = generate_ticks("BTCUSD", date(2024, 3, 9))  # a Saturday
    assert btc["ts"].dt.hour().n_unique() == 24


def test_every_tick_lies_in_open_hours_and_on_the_price_grid():
    for symbol, day in (("EURUSD", date(2024, 3, 8)), ("USDJPY", date(2024, 3, 10)), ("XAUUSD", date(2024, 7, 1))):
        spec = instrument(symbol)
        ticks = generate_ticks(symbol, day)
        assert ticks.select(trading_open(pl.col("ts"), spec.asset_class).all()).item()
        points = (ticks["bid"] / spec.point).to_numpy()
        assert np.abs(points - np.rint(points)).max() < 1e-6
        spread_points = ((ticks["ask"] - ticks["bid"]) / spec.point).round(6)
        assert spread_points.min() >= 1  # never locked or crossed
        assert ticks["ts"].is_sorted()


def test_session_rates_and_rollover_spreads():
    ticks = pl.concat([generate_ticks("EURUSD", date(2024, 1, 15) + timedelta(days=i)) for i in range(4)])
    ny = ticks.with_columns(
        pl.col("ts").dt.convert_time_zone(NY).alias("ny"),
        ((pl.col("ask") - pl.col("bid")) / 1e-4).alias("spread_pips"),
    ).with_columns((pl.col("ny").dt.hour().cast(pl.Int32) * 60 + pl.col("ny").dt.minute()).alias("minute"))
    overlap = ny.filter(pl.col("minute").is_between(8 * 60, 11 * 60, closed="left"))  # London + New York
    asia = ny.filter(pl.col("minute").is_between(19 * 60, 22 * 60, closed="left"))  # Tokyo only
    assert overlap.height / 3 > 2.5 * asia.height / 3
    rollover = ny.filter(pl.col("minute").is_between(17 * 60, 17 * 60 + 5, closed="left"))
    london = ny.filter(pl.col("minute").is_between(4 * 60, 8 * 60, closed="left"))
    assert rollover["spread_pips"].median() > 4 * london["spread_pips"].median()
    assert 0.1 < london["spread_pips"].median() < 0.6
    # Roughly a realistic number of quote updates per day.
    assert 60_000 < ticks.height / 4 < 150_000


def test_volatility_clusters():
    ticks = pl.concat([generate_ticks("BTCUSD", date(2024, 4, 1) + timedelta(days=i)) for i in range(5)])
    minute = ticks.group_by_dynamic("ts", every="1m").agg(((pl.col("bid") + pl.col("ask")) / 2).last().alias("mid"))
    absolute = minute["mid"].log().diff().drop_nulls().abs().to_numpy()
    autocorrelation = np.corrcoef(absolute[:-10], absolute[10:])[0, 1]
    assert autocorrelation > 0.1  # |returns| ten minutes apart are still related
    raw_returns = minute["mid"].log().diff().drop_nulls().to_numpy()
    assert abs(np.corrcoef(raw_returns[:-1], raw_returns[1:])[0, 1]) < 0.1  # returns themselves are not


def test_prices_continue_across_days_and_stay_realistic():
    for symbol in ("EURUSD", "XAUUSD", "BTCUSD"):
        spec = instrument(symbol)
        friday, monday = generate_ticks(symbol, date(2024, 3, 8)), generate_ticks(symbol, date(2024, 3, 11))
        day1, day2 = generate_ticks(symbol, date(2024, 3, 5)), generate_ticks(symbol, date(2024, 3, 6))
        last = (day1["bid"][-1] + day1["ask"][-1]) / 2
        first = (day2["bid"][0] + day2["ask"][0]) / 2
        assert abs(first / last - 1) < 0.003
        assert abs(anchor_price(7, symbol, date(2024, 3, 6)) / first - 1) < 0.003
        for ticks in (friday, monday):
            level = ticks["bid"].median() / spec.base_price
            assert 0.4 < level < 2.5


@pytest.mark.parametrize("symbol", ["EURGBP", "XAGUSD", "ETHUSD", "SOLUSDT"])
def test_other_symbols_are_inferred(symbol):
    ticks = generate_ticks(symbol, date(2024, 3, 6))
    assert ticks.height > 1000
    assert instrument(symbol).asset_class in set(AssetClass)


def test_unknown_symbols_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown instrument 'FOOBAR'"):
        instrument("FOOBAR")
