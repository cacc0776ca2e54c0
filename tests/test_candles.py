"""Candles against an independent, row-by-row computation on the same ticks."""

from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from models.market.candles import aggregate_ticks, bars_for_window, window_lookback_start
from models.market.synthetic import generate_ticks
from models.market.ticks import TICK_SCHEMA, conform_ticks
from models.market.timeframes import ALL_TIMEFRAMES, DayBoundary, Timeframe, bar_close_at, bar_open_at, bar_open_expr

# -- the reference: plain Python, datetime and zoneinfo, one tick at a time ------------------


def reference_open(ts: datetime, tf: Timeframe, boundary: DayBoundary) -> datetime:
    if tf.minutes <= 60 or (boundary is DayBoundary.UTC and tf in (Timeframe.H4, Timeframe.D1)):
        seconds = tf.minutes * 60
        return datetime.fromtimestamp(int(ts.timestamp()) // seconds * seconds, UTC)
    zone = ZoneInfo("UTC" if boundary is DayBoundary.UTC else "America/New_York")
    offset = timedelta(hours=0 if boundary is DayBoundary.UTC else 17)
    wall = ts.astimezone(zone).replace(tzinfo=None) - offset
    if tf is Timeframe.W1:
        day = wall.date() - timedelta(days=(wall.weekday() + 1) % 7)  # back to Sunday
        key = datetime(day.year, day.month, day.day)
    elif tf is Timeframe.D1:
        key = datetime(wall.year, wall.month, wall.day)
    else:
        key = wall.replace(hour=wall.hour // 4 * 4, minute=0, second=0, microsecond=0)
    return (key + offset).replace(tzinfo=zone, fold=0).astimezone(UTC)


def reference_bars(rows: list[dict], boundary: DayBoundary) -> dict[tuple[str, str, datetime], dict]:
    order = sorted(range(len(rows)), key=lambda i: rows[i]["ts"])  # Python's sort is stable
    bars: dict[tuple[str, str, datetime], dict] = {}
    for i in order:
        tick = rows[i]
        quote = tick["bid"] is not None and tick["ask"] is not None
        ref = tick["price"] if tick["price"] is not None else (tick["bid"] + tick["ask"]) / 2
        for tf in ALL_TIMEFRAMES:
            key = (tick["symbol"], tf.value, reference_open(tick["ts"], tf, boundary))
            bar = bars.setdefault(key, {"open": ref, "high": ref, "low": ref, "bid_close": None, "ask_close": None,
                                        "volume": 0.0, "pv": 0.0, "ticks": 0, "quotes": 0, "spread_sum": 0.0,
                                        "spread_max": None, "ref_sum": 0.0})
            bar["high"], bar["low"], bar["close"] = max(bar["high"], ref), min(bar["low"], ref), ref
            bar["ticks"] += 1
            bar["ref_sum"] += ref
            if tick["bid"] is not None:
                bar["bid_close"] = tick["bid"]
            if tick["ask"] is not None:
                bar["ask_close"] = tick["ask"]
            if tick["price"] is not None and tick["size"] is not None:
                bar["volume"] += tick["size"]
                bar["pv"] += tick["price"] * tick["size"]
            if quote:
                spread = tick["ask"] - tick["bid"]
                bar["quotes"] += 1
                bar["spread_sum"] += spread
                bar["spread_max"] = spread if bar["spread_max"] is None else max(bar["spread_max"], spread)
    for bar in bars.values():
        bar["vwap"] = bar["pv"] / bar["volume"] if bar["volume"] > 0 else bar["ref_sum"] / bar["ticks"]
        bar["spread_mean"] = bar["spread_sum"] / bar["quotes"] if bar["quotes"] else None
    return bars


def assert_matches_reference(ticks: pl.DataFrame, boundary: DayBoundary) -> pl.DataFrame:
    bars = aggregate_ticks(ticks, boundary=boundary)
    expected = reference_bars(ticks.to_dicts(), boundary)
    got = {(r["symbol"], r["timeframe"], r["ts"]): r for r in bars.to_dicts()}
    assert set(got) == set(expected), f"bar keys differ: missing {set(expected) - set(got)}, extra {set(got) - set(expected)}"
    for key, want in expected.items():
        have = got[key]
        for column, ref_name in (("open", "open"), ("high", "high"), ("low", "low"), ("close", "close"),
                                 ("bid_close", "bid_close"), ("ask_close", "ask_close"), ("volume", "volume"),
                                 ("tick_count", "ticks"), ("quote_count", "quotes"), ("spread_mean", "spread_mean"),
                                 ("spread_max", "spread_max"), ("vwap", "vwap")):
            a, b = have[column], want[ref_name]
            if b is None:
                assert a is None, (key, column, a)
            else:
                assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12), (key, column, a, b)
    return bars


def quotes(symbol: str, rows: list[tuple[datetime, float, float]]) -> pl.DataFrame:
    return conform_ticks(pl.DataFrame(
        {"symbol": [symbol] * len(rows), "ts": [r[0] for r in rows], "bid": [r[1] for r in rows],
         "ask": [r[2] for r in rows], "source": ["test"] * len(rows)},
        schema_overrides={"ts": pl.Datetime("ms", "UTC")},
    ))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- bar boundaries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "tf", "boundary", "expected_open", "expected_close"),
    [
        (utc(2024, 3, 6, 13, 47, 5), Timeframe.M15, DayBoundary.UTC, utc(2024, 3, 6, 13, 45), utc(2024, 3, 6, 14)),
        (utc(2024, 3, 6, 13, 47), Timeframe.H4, DayBoundary.UTC, utc(2024, 3, 6, 12), utc(2024, 3, 6, 16)),
        (utc(2024, 3, 6, 13, 47), Timeframe.W1, DayBoundary.UTC, utc(2024, 3, 3), utc(2024, 3, 10)),
        # 17:00 New York is 22:00 UTC in winter and 21:00 UTC in summer.
        (utc(2024, 3, 6, 13, 47), Timeframe.D1, DayBoundary.NEW_YORK_17, utc(2024, 3, 5, 22), utc(2024, 3, 6, 22)),
        (utc(2024, 7, 3, 21, 30), Timeframe.D1, DayBoundary.NEW_YORK_17, utc(2024, 7, 3, 21), utc(2024, 7, 4, 21)),
        # The FX day around the March switch is 23 hours long.
        (utc(2024, 3, 10, 12), Timeframe.D1, DayBoundary.NEW_YORK_17, utc(2024, 3, 9, 22), utc(2024, 3, 10, 21)),
        # ... and 25 hours around the November switch.
        (utc(2024, 11, 3, 12), Timeframe.D1, DayBoundary.NEW_YORK_17, utc(2024, 11, 2, 21), utc(2024, 11, 3, 22)),
        # The FX week opens on Sunday at 17:00 New York.
        (utc(2024, 3, 11, 9), Timeframe.W1, DayBoundary.NEW_YORK_17, utc(2024, 3, 10, 21), utc(2024, 3, 17, 21)),
        (utc(2024, 3, 10, 20, 59), Timeframe.W1, DayBoundary.NEW_YORK_17, utc(2024, 3, 3, 22), utc(2024, 3, 10, 21)),
        # H4 under the New York boundary: 17, 21, 1, 5, 9, 13 local.
        (utc(2024, 3, 6, 13, 47), Timeframe.H4, DayBoundary.NEW_YORK_17, utc(2024, 3, 6, 10), utc(2024, 3, 6, 14)),
    ],
)
def test_bar_boundaries(moment, tf, boundary, expected_open, expected_close):
    assert bar_open_at(moment, tf, boundary) == expected_open
    assert bar_close_at(expected_open, tf, boundary) == expected_close


# -- against the reference -----------------------------------------------------------------


@pytest.mark.parametrize("boundary", list(DayBoundary))
def test_fx_week_with_weekend_and_dst_switch(boundary):
    """EURUSD from Thursday to Tuesday across the closed weekend and the US March switch."""
    days = [date(2024, 3, 7) + timedelta(days=i) for i in range(6)]
    ticks = pl.concat([generate_ticks("EURUSD", d) for d in days]).gather_every(15)
    bars = assert_matches_reference(ticks, boundary)
    d1 = bars.filter(pl.col("timeframe") == "D1")["ts"].to_list()
    if boundary is DayBoundary.NEW_YORK_17:
        # No bar for the closed Saturday; the Sunday open starts Monday's FX day at 21:00 UTC.
        assert d1 == [utc(2024, 3, 6, 22), utc(2024, 3, 7, 22), utc(2024, 3, 10, 21), utc(2024, 3, 11, 21), utc(2024, 3, 12, 21)]
    else:
        assert utc(2024, 3, 9) not in d1 and utc(2024, 3, 10) in d1


@pytest.mark.parametrize("boundary", list(DayBoundary))
def test_crypto_through_the_ambiguous_autumn_hour(boundary):
    """BTCUSD trades through 01:00-02:00 New York, which happens twice on 2024-11-03."""
    days = [date(2024, 11, 1) + timedelta(days=i) for i in range(5)]
    ticks = pl.concat([generate_ticks("BTCUSD", d) for d in days]).gather_every(10)
    bars = assert_matches_reference(ticks, boundary)
    if boundary is DayBoundary.NEW_YORK_17:
        h4 = bars.filter((pl.col("timeframe") == "H4") & (pl.col("ts") == utc(2024, 11, 3, 5)))
        # 01:00 EDT to 05:00 EST is one five-hour bar.
        assert h4.height == 1
        assert bar_close_at(utc(2024, 11, 3, 5), Timeframe.H4, boundary) == utc(2024, 11, 3, 10)


def test_out_of_order_input_gives_the_same_bars():
    ticks = pl.concat([generate_ticks("XAUUSD", date(2024, 3, 5 + i)) for i in range(2)]).gather_every(7)
    shuffled = ticks.sample(fraction=1.0, shuffle=True, seed=3)
    assert not shuffled["ts"].is_sorted()
    # Equal timestamps would make a shuffle change the stable order; this data has none that differ.
    distinct = ticks.unique(subset="ts", keep="none")
    expected = aggregate_ticks(distinct)
    assert aggregate_ticks(distinct.sample(fraction=1.0, shuffle=True, seed=5)).equals(expected)
    assert_matches_reference(shuffled, DayBoundary.UTC)


def test_equal_timestamps_keep_arrival_order():
    t0, t1 = utc(2024, 3, 5, 10, 0, 1), utc(2024, 3, 5, 10, 0, 2)
    arrival = [(t1, 1.2000, 1.2002), (t0, 1.1000, 1.1002), (t0, 1.3000, 1.3002), (t1, 1.0500, 1.0502)]
    m1 = aggregate_ticks(quotes("EURUSD", arrival), [Timeframe.M1]).row(0, named=True)
    # Sorted stably: t0 1.1001, t0 1.3001, t1 1.2001, t1 1.0501.
    assert m1["open"] == pytest.approx(1.1001, abs=1e-12)
    assert m1["close"] == pytest.approx(1.0501, abs=1e-12)
    assert m1["high"] == pytest.approx(1.3001, abs=1e-12)
    assert m1["low"] == pytest.approx(1.0501, abs=1e-12)
    assert m1["bid_close"] == 1.05 and m1["ask_close"] == 1.0502
    assert m1["tick_count"] == 4 and m1["quote_count"] == 4
    assert m1["spread_mean"] == pytest.approx(0.0002, abs=1e-15)


def test_a_day_without_ticks_has_no_bars():
    rows = [(utc(2024, 5, 6, 10, 0, 5), 1.1, 1.1002), (utc(2024, 5, 8, 11, 30), 1.2, 1.2002)]
    bars = assert_matches_reference(quotes("EURUSD", rows), DayBoundary.UTC)
    assert bars.filter(pl.col("ts").dt.date() == date(2024, 5, 7)).is_empty()
    assert bars.group_by("timeframe").len().sort("timeframe")["len"].to_list() == [2, 2, 2, 2, 2, 2, 2, 1]


def test_trades_volume_and_vwap():
    ticks = conform_ticks(pl.DataFrame({
        "symbol": ["BTCUSD"] * 4,
        "ts": [utc(2024, 5, 6, 10, 0, s) for s in (1, 2, 3, 4)],
        "bid": [None, 100.0, None, None],
        "ask": [None, 100.5, None, None],
        "price": [100.0, None, 102.0, 101.0],
        "size": [1.0, None, 3.0, None],  # a trade print without size counts as a tick, not volume
        "source": ["test"] * 4,
    }))
    bar = assert_matches_reference(ticks, DayBoundary.UTC).filter(pl.col("timeframe") == "M1").row(0, named=True)
    assert bar["volume"] == 4.0
    assert bar["vwap"] == pytest.approx((100.0 * 1 + 102.0 * 3) / 4)
    assert (bar["open"], bar["high"], bar["low"], bar["close"]) == (100.0, 102.0, 100.0, 101.0)
    assert (bar["tick_count"], bar["quote_count"]) == (4, 1)
    assert (bar["bid_close"], bar["ask_close"], bar["spread_mean"]) == (100.0, 100.5, 0.5)


def test_sources_are_combined_per_bar():
    rows = quotes("EURUSD", [(utc(2024, 5, 6, 10, 0, 1), 1.1, 1.1002), (utc(2024, 5, 6, 10, 0, 2), 1.1, 1.1002)])
    rows = rows.with_columns(pl.Series("source", ["dukascopy", "polygon"]))
    bars = aggregate_ticks(rows)
    assert set(bars["source"]) == {"dukascopy+polygon"}


def test_empty_input_gives_empty_bars():
    assert aggregate_ticks(pl.DataFrame(schema=TICK_SCHEMA)).is_empty()


@pytest.mark.parametrize("boundary", list(DayBoundary))
def test_windows_in_any_order_rebuild_the_full_history(boundary):
    """Day windows, each built from its look-back, keep the most complete version of every
    bar; the result equals aggregating all ticks at once (W1 and New York D1 span days)."""
    days = [date(2024, 3, 7) + timedelta(days=i) for i in range(8)]
    ticks = pl.concat([generate_ticks("BTCUSD", d) for d in days]).gather_every(5)
    final: dict[tuple[str, datetime], tuple[datetime, dict]] = {}
    for day in random.Random(11).sample(days, len(days)):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        visible = ticks.filter((pl.col("ts") >= window_lookback_start(start, ALL_TIMEFRAMES, boundary)) & (pl.col("ts") < end))
        for bar in bars_for_window(visible, start, boundary=boundary).to_dicts():
            key = (bar["timeframe"], bar["ts"])
            if key not in final or final[key][0] <= end:
                final[key] = (end, bar)
    expected = aggregate_ticks(ticks, boundary=boundary).sort("timeframe", "ts")
    got = pl.DataFrame([bar for _, bar in final.values()], schema=expected.schema).sort("timeframe", "ts")
    assert got.height == expected.height
    assert got.drop("vwap", "spread_mean").equals(expected.drop("vwap", "spread_mean"))
    for column in ("vwap", "spread_mean"):  # rebuilt from sums: equal to rounding
        assert (got[column] - expected[column]).abs().max() < 1e-9 * expected["open"].max()


@pytest.mark.parametrize("boundary", list(DayBoundary))
def test_scalar_bar_open_is_the_vectorised_one(boundary):
    """The live path's plain-Python bar opens equal the polars expression the batch uses,
    at random moments and every few minutes around six DST switches."""
    rng = random.Random(5)
    moments = [datetime(2023, 1, 1, tzinfo=UTC) + timedelta(milliseconds=rng.randrange(4 * 365 * 86_400_000)) for _ in range(1500)]
    for switch in ("2023-03-12", "2023-11-05", "2024-03-10", "2024-11-03", "2025-03-09", "2025-11-02"):
        start = datetime.fromisoformat(f"{switch}T00:00:00+00:00")
        moments += [start + timedelta(minutes=m) for m in range(0, 48 * 60, 13)]
    frame = pl.DataFrame({"ts": moments}, schema={"ts": pl.Datetime("ms", "UTC")})
    for tf in ALL_TIMEFRAMES:
        expected = frame.select(bar_open_expr(pl.col("ts"), tf, boundary))["ts"].to_list()
        assert [bar_open_at(t, tf, boundary) for t in moments] == expected, tf
