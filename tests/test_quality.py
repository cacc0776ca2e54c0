"""Tick and vendor-candle validation: every bad row is quarantined with its reason; good rows
are kept in order."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl

from models.market.instruments import AssetClass
from models.market.quality import CANDLE_REASONS, REASONS, TickRules, stored_violations, trading_gaps, validate_candles, validate_ticks
from models.market.synthetic import generate_ticks
from models.market.ticks import conform_ticks
from resources.vendors.base import VENDOR_M1_SCHEMA

START = datetime(2024, 3, 6, tzinfo=UTC)
END = START + timedelta(days=1)


def frame(rows: list[dict]) -> pl.DataFrame:
    base = {"symbol": "EURUSD", "bid": 1.1, "ask": 1.1001, "source": "test"}
    return conform_ticks(pl.DataFrame([{**base, **row} for row in rows], infer_schema_length=None))


def at(minute: int, second: float = 0.0) -> datetime:
    return START + timedelta(minutes=minute, seconds=second)


def test_each_bad_row_gets_its_reason_and_nothing_is_lost():
    rows = [
        {"ts": at(1)},  # good
        {"ts": at(2), "bid": 1.1002, "ask": 1.1001},  # crossed
        {"ts": at(3), "bid": 1.1001, "ask": 1.1001},  # locked
        {"ts": at(4), "bid": float("nan")},  # NaN
        {"ts": at(5), "ask": float("inf")},  # inf
        {"ts": at(6), "bid": -1.1},  # non-positive
        {"ts": at(7), "bid": 0.0},  # non-positive
        {"ts": at(8), "bid": None, "ask": None},  # neither quote nor trade
        {"ts": at(9), "ask": None},  # half a quote
        {"ts": START - timedelta(seconds=1)},  # previous day
        {"ts": END},  # next day
        {"ts": None},  # no timestamp
        {"ts": at(10), "bid": 1.1, "ask": 1.2},  # a 10% spread
        {"ts": at(11), "bid_size": -5.0},  # negative size
        {"ts": at(12), "symbol": "GBPUSD"},  # another symbol's tick
        {"ts": at(13), "bid": 2150.1, "ask": 2150.4},  # XAUUSD's level under EURUSD
        {"ts": at(1)},  # identical to the first, no id to say it is a copy: a second update, kept
        {"ts": at(1), "bid": 1.1000, "ask": 1.1002},  # same time, other prices: legitimate
    ]
    result = validate_ticks(frame(rows), "EURUSD", START, END, band=(0.108, 10.8))
    assert result.reason_counts == {
        "crossed_quote": 1, "locked_quote": 1, "non_finite_price": 2, "non_positive_price": 2, "no_price": 2,
        "outside_partition": 2, "missing_timestamp": 1, "implausible_spread": 1, "negative_size": 1,
        "wrong_symbol": 1, "implausible_price": 1,
    }
    assert set(result.reason_counts) <= set(REASONS)
    assert result.clean.height + result.quarantine.height == len(rows)
    assert result.clean["ask"].to_list() == [1.1001, 1.1001, 1.1002]
    assert result.clean["seq"].to_list() == [0, 1, 2]
    assert result.quarantine.filter(pl.col("reason") == "wrong_symbol")["symbol"].to_list() == ["GBPUSD"]


def test_spread_outliers_relative_to_the_day():
    rows = [{"ts": at(i), "bid": 1.1, "ask": 1.1001} for i in range(100)]
    rows.append({"ts": at(200), "bid": 1.1, "ask": 1.1 + 0.0001 * 80})  # 80x the median spread
    rows.append({"ts": at(201), "bid": 1.1, "ask": 1.1 + 0.0001 * 20})  # wide, but plausible at a rollover
    result = validate_ticks(frame(rows), "EURUSD", START, END, TickRules(max_spread_ratio=50))
    assert result.reason_counts == {"implausible_spread": 1}
    assert result.quarantine["ts"].to_list() == [at(200)]


def test_out_of_order_rows_are_counted_and_sorted_stably():
    rows = [{"ts": at(3), "bid": 1.3}, {"ts": at(1), "bid": 1.1}, {"ts": at(1), "bid": 1.0}, {"ts": at(2), "bid": 1.05}]
    result = validate_ticks(frame([{**r, "ask": r["bid"] + 0.0001} for r in rows]), "EURUSD", START, END)
    assert result.out_of_order == 1
    assert result.clean["bid"].to_list() == [1.1, 1.0, 1.05, 1.3]
    assert result.quarantine.is_empty()


def test_stored_violations_flag_what_validation_would_reject():
    ticks = validate_ticks(generate_ticks("EURUSD", date(2024, 3, 6)), "EURUSD", START, END).clean
    assert not any(stored_violations(ticks, "EURUSD", START, END).values())
    broken = ticks.with_columns(
        pl.when(pl.col("seq") == 10).then(pl.col("ask") + 0.0001).otherwise(pl.col("bid")).alias("bid"),
        pl.when(pl.col("seq") == 20).then(pl.col("seq") + 1_000_000).otherwise(pl.col("seq")).alias("seq"),
    )
    violations = stored_violations(broken, "EURUSD", START, END)
    assert violations["crossed_quote"] == 1
    assert violations["unsorted"] == 1


def test_gaps_count_only_open_market_time():
    friday = datetime(2024, 3, 8, tzinfo=UTC)
    ticks = generate_ticks("EURUSD", date(2024, 3, 8))
    assert trading_gaps(ticks["ts"], friday, friday + timedelta(days=1), AssetClass.FX, timedelta(minutes=5)).is_empty()
    # Remove 40 minutes in the London morning: one gap of about 40 open minutes.
    hole = ticks.filter(~pl.col("ts").is_between(friday + timedelta(hours=9), friday + timedelta(hours=9, minutes=40)))
    gaps = trading_gaps(hole["ts"], friday, friday + timedelta(days=1), AssetClass.FX, timedelta(minutes=5))
    assert gaps.height == 1
    assert 39 <= gaps["open_minutes"][0] <= 41
    # A whole closed Saturday is no gap; a whole open Wednesday without ticks is one.
    saturday = datetime(2024, 3, 9, tzinfo=UTC)
    empty = pl.Series("ts", [], dtype=pl.Datetime("ms", "UTC"))
    assert trading_gaps(empty, saturday, saturday + timedelta(days=1), AssetClass.FX, timedelta(minutes=5)).is_empty()
    wednesday = trading_gaps(empty, START, END, AssetClass.FX, timedelta(minutes=5))
    assert wednesday["open_minutes"].to_list() == [1440]


def test_impossible_candles_get_their_reason_and_the_first_good_candle_of_a_minute_is_kept():
    good = {"open": 1.10, "high": 1.12, "low": 1.09, "close": 1.11, "volume": 10.0, "vwap": 1.105, "tick_count": 7}
    rows = [
        {**good, "ts": at(1)},
        {**good, "ts": at(2), "high": 1.105},  # high below the close
        {**good, "ts": at(3), "low": 1.111},  # low above the open and the close
        {**good, "ts": at(4), "close": float("nan")},
        {**good, "ts": at(5), "vwap": float("inf")},
        {**good, "ts": at(6), "low": 0.0},
        {**good, "ts": at(7), "open": None},
        {**good, "ts": at(8), "volume": -1.0},
        {**good, "ts": at(9), "volume": float("nan")},
        {**good, "ts": at(1), "close": 1.095},  # a second candle for minute 1
        {**good, "ts": END},
        {**good, "ts": None},
        {**good, "ts": at(10), "vwap": None, "volume": None},  # optional fields missing: fine
    ]
    raw = pl.DataFrame(rows, schema=VENDOR_M1_SCHEMA)
    checked = validate_candles(raw, START, END)
    assert checked.clean["ts"].to_list() == [at(1), at(10)]
    assert checked.clean["close"].to_list() == [1.11, 1.11]  # the first of minute 1, not the repeat
    assert checked.quarantine["reason"].to_list() == [
        "inconsistent_ohlc", "inconsistent_ohlc", "non_finite_price", "non_finite_price", "non_positive_price",
        "missing_price", "invalid_volume", "invalid_volume", "duplicate", "outside_partition", "missing_timestamp",
    ]
    assert checked.clean.height + checked.quarantine.height == raw.height
    assert set(checked.reason_counts) <= set(CANDLE_REASONS)


def test_identical_prints_are_separate_fills_and_only_a_repeated_vendor_id_is_a_duplicate():
    """A futures tape prints the same price and size at the same millisecond many times:
    every print is a fill. Only the source saying it sent a row twice (its own id again) makes
    a duplicate, and ids are the source's own (another vendor's id 7 is another row)."""
    tape = [{"ts": at(1), "bid": None, "ask": None, "price": 1.1, "size": 2.0, "vendor_seq": n} for n in range(5)]
    tape += [{"ts": at(1), "bid": None, "ask": None, "price": 1.1, "size": 2.0, "vendor_seq": None}] * 3  # no ids: kept
    tape += [{"ts": at(1), "bid": None, "ask": None, "price": 1.1, "size": 2.0, "vendor_seq": 3}]  # id 3 again: a copy
    tape += [{"ts": at(1), "bid": None, "ask": None, "price": 1.1, "size": 2.0, "vendor_seq": 3, "source": "backup"}]
    result = validate_ticks(frame(tape), "EURUSD", START, END)
    assert result.reason_counts == {"duplicate": 1}
    assert result.clean.height == 9 and result.clean["size"].sum() == 18.0
    assert result.quarantine["vendor_seq"].to_list() == [3]


def test_a_price_level_of_another_symbol_is_quarantined():
    from models.market.instruments import instrument

    low, high = instrument("XAUUSD").plausible_prices()
    assert low <= 250 and high >= 4_500  # gold since 2000
    euro = [{"ts": at(1), "bid": 1.0851, "ask": 1.0852}]
    assert validate_ticks(frame(euro).with_columns(pl.lit("XAUUSD").alias("symbol")), "XAUUSD", START, END,
                          band=(low, high)).reason_counts == {"implausible_price": 1}
    e_low, e_high = instrument("EURUSD").plausible_prices()
    assert e_low < 0.82 and e_high > 1.60 and e_high < 150  # EURUSD's history; USDJPY levels are out
