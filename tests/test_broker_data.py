"""The user's broker data: sampled from the (fake) terminal, stored in the real embedded
ClickHouse (idempotently, quotes expiring after 24 hours), and the analyses over it on
constructed data with known answers, through the Dagster assets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from assets.broker import broker_quotes_m1, broker_vs_vendor, predictions_vs_user_trades
from models.broker.analysis import predictions_vs_trades, price_deviation, quote_minutes, spread_by_hour
from models.market.candles import BAR_SCHEMA
from resources.brokers.mt5 import constants as C
from resources.brokers.mt5.broker import MT5Broker, MT5Config
from resources.brokers.mt5.fake import FakeTerminal
from resources.brokers.mt5.sampler import BrokerDataSampler
from resources.warehouse.broker import (
    read_account,
    read_quote_minutes,
    read_quotes,
    read_trades,
    store_sample,
    write_quotes,
    write_trades,
)
from resources.warehouse.market import write_bars
from models.trading.orders import Order, OrderType, Side
from resources.warehouse.client import TableWrite
from resources.warehouse.commits import PARTITIONED
from resources.warehouse.learning import PREDICTION_COLUMNS

T0 = 1_709_546_400_000  # 2024-03-04 10:00 UTC


def _fake() -> FakeTerminal:
    fake = FakeTerminal(commission_per_lot=7.0, start_ms=T0, server_utc_offset_s=7200, balance=50_000.0)
    fake.add_symbol("EURUSD")
    fake.initialize()
    fake.symbol_select("EURUSD")
    fake.set_quote("EURUSD", 1.08500, 1.08502, T0)
    return fake


def test_the_sampler_reads_account_quotes_and_deals_in_utc():
    fake = _fake()
    sampler = BrokerDataSampler(fake, ["EURUSD"], server_utc_offset_s=7200, magics=[77], clock=fake.utc_now)
    account = sampler.account().row(0, named=True)
    assert (account["balance"], account["equity"], account["margin"], account["margin_level"]) == (50_000.0, 50_000.0, 0.0, None)
    broker = MT5Broker(fake, MT5Config(magic=77, symbols=("EURUSD",), server_utc_offset_s=7200), clock=fake.utc_now)
    broker.connect()
    broker.submit(Order("tf00000000000000e1", "EURUSD", Side.BUY, OrderType.MARKET, 100_000.0, "entry", T0))
    fake.place_manual("EURUSD", C.ORDER_TYPE_SELL, 0.5)
    fake.set_quote("EURUSD", 1.08600, 1.08602, T0 + 60_000)
    account = sampler.account().row(0, named=True)
    margin = (100_000 * 1.08502 + 50_000 * 1.085) / 30
    assert account["margin"] == pytest.approx(margin)
    assert account["equity"] == pytest.approx(50_000 - 7 - 3.5 + (1.086 - 1.08502) * 100_000 + (1.085 - 1.08602) * 50_000)
    assert account["margin_level"] == pytest.approx(account["equity"] / margin * 100)
    quotes = sampler.quotes()
    assert quotes.row(0, named=True)["ts"] == datetime(2024, 3, 4, 10, 1, tzinfo=UTC)  # the server's +2 h undone
    assert sampler.quotes().is_empty()  # the same tick is not sampled twice
    deals = sampler.deals(since_ms=T0 - 3_600_000)
    assert deals["client_id"].to_list() == ["tf00000000000000e1", None] and deals["side"].to_list() == [1, -1]
    assert deals["units"].to_list() == [100_000.0, 50_000.0] and deals["reason"].to_list() == ["expert", "client"]
    assert deals["ts"][0] == datetime(2024, 3, 4, 10, 0, tzinfo=UTC)


def test_samples_are_stored_once_however_often_they_arrive(warehouse):
    fake = _fake()
    sampler = BrokerDataSampler(fake, ["EURUSD"], server_utc_offset_s=7200, clock=fake.utc_now)
    fake.place_manual("EURUSD", C.ORDER_TYPE_BUY, 0.2)
    first = store_sample(warehouse, sampler, since_ms=T0 - 3_600_000)
    assert first == {"broker_account": 1, "broker_quotes": 1, "broker_trades": 1}
    write_trades(warehouse, sampler.deals(since_ms=T0 - 3_600_000))  # the same deal again (a redelivery)
    write_quotes(warehouse, read_quotes(warehouse))
    assert read_trades(warehouse).height == 1 and read_quotes(warehouse).height == 1 and read_account(warehouse).height == 1
    trade = read_trades(warehouse).row(0, named=True)
    assert (trade["volume"], trade["units"], trade["entry"], trade["magic"]) == (0.2, 20_000.0, "in", 0)


def test_broker_quotes_expire_24_hours_after_they_arrive(warehouse):
    ddl = warehouse.query_frame("SHOW CREATE TABLE broker_quotes")[0, 0]
    assert "TTL toDateTime(received_at) + toIntervalHour(24)" in ddl
    now = datetime.now(UTC)
    warehouse.command(
        "INSERT INTO broker_quotes (server, symbol, ts, bid, ask, received_at) VALUES "
        "('s', 'EURUSD', {a:DateTime64(3, 'UTC')}, 1.1, 1.10002, {old:DateTime64(3, 'UTC')}), "
        "('s', 'EURUSD', {b:DateTime64(3, 'UTC')}, 1.1, 1.10002, {new:DateTime64(3, 'UTC')})",
        {"a": now - timedelta(hours=30), "old": now - timedelta(hours=25), "b": now, "new": now},
    )
    warehouse.command("OPTIMIZE TABLE broker_quotes FINAL")
    assert read_quotes(warehouse)["received_at" if False else "ts"].to_list() == [now.replace(microsecond=now.microsecond // 1000 * 1000)]


def test_quote_minutes_spread_by_hour_and_price_deviation_known_answers():
    base = datetime(2024, 3, 4, 8, 0, tzinfo=UTC)
    rows = []
    for minute in range(120):  # hour 8: 2-pip spread; hour 9: 1 pip; 3 quotes a minute; mid 0.3 pip above the vendor
        spread = 0.0002 if minute < 60 else 0.0001
        for k in range(3):
            mid = 1.1 + minute * 1e-5 + 0.00003
            rows.append({"server": "s", "symbol": "EURUSD", "ts": base + timedelta(minutes=minute, seconds=10 + 20 * k),
                         "bid": mid - spread / 2, "ask": mid + spread / 2})
    minutes = quote_minutes(pl.DataFrame(rows))
    assert minutes.height == 120 and minutes["quotes"].to_list() == [3] * 120
    assert minutes["spread_mean"][0] == pytest.approx(0.0002) and minutes["mid_close"][5] == pytest.approx(1.1 + 5e-5 + 3e-5)
    vendor = pl.DataFrame({"symbol": "EURUSD", "ts": [base + timedelta(minutes=m) for m in range(0, 120, 2)],  # every other minute
                           "close": [1.1 + m * 1e-5 for m in range(0, 120, 2)], "spread_mean": 0.0001})
    hours = spread_by_hour(minutes, vendor)
    assert hours["hour"].to_list() == [8, 9] and hours["minutes"].to_list() == [30, 30]
    assert hours["ratio"].to_list() == pytest.approx([2.0, 1.0]) and hours["difference"].to_list() == pytest.approx([0.0001, 0.0])
    deviation = price_deviation(minutes, vendor, {"EURUSD": 1e-4}).row(0, named=True)
    assert deviation["minutes"] == 60 and deviation["mean"] == pytest.approx(3e-5) and deviation["mean_pips"] == pytest.approx(0.3)
    assert deviation["max_abs"] == pytest.approx(3e-5) and deviation["mean_abs_bps"] == pytest.approx(3e-5 / 1.1 * 1e4, rel=1e-3)


def _trades() -> pl.DataFrame:
    """Four positions: (open minute, side, result). Results include both legs' commissions."""
    base = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    spec = [(7, 1, 30.0), (17, -1, -20.0), (27, 1, -10.0), (37, -1, None)]  # the last one is still open
    rows, deal = [], 1
    for n, (minute, side, result) in enumerate(spec):
        rows.append({"deal": deal, "position_id": 100 + n, "ts": base + timedelta(minutes=minute), "symbol": "EURUSD",
                     "side": side, "entry": "in", "profit": 0.0, "commission": -1.0, "swap": 0.0, "fee": 0.0})
        deal += 1
        if result is not None:
            rows.append({"deal": deal, "position_id": 100 + n, "ts": base + timedelta(minutes=minute + 5), "symbol": "EURUSD",
                         "side": -side, "entry": "out", "profit": result + 2.0, "commission": -1.0, "swap": 0.0, "fee": 0.0})
            deal += 1
    return pl.DataFrame(rows)


def _predictions() -> pl.DataFrame:
    """M5 predictions of one model: up (0.7) for the bars closing before 10:10 and 10:30, down before 10:20 and 10:40."""
    base = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
    rows = []
    for k in range(12):
        ts = base + timedelta(minutes=5 * k - 5)
        up = (k // 2) % 2 == 0
        rows.append({"model_name": "lgbm", "model_version": "3", "symbol": "EURUSD", "timeframe": "M5", "ts": ts,
                     "close_ts": ts + timedelta(minutes=5), "fold": 4, "target": "direction_1h",
                     "prediction": 1.0 if up else 0.0, "prob_up": 0.7 if up else 0.3, "feature_set": "fs1"})
    return pl.DataFrame(rows)


def test_predictions_against_the_users_trades_known_answer():
    per_trade, summary = predictions_vs_trades(_trades(), _predictions())
    # 10:07 buy meets the 10:05 close (up): aligned, won; 10:17 sell meets 10:15 (down): aligned, lost;
    # 10:27 buy meets 10:25 (up): aligned, lost; 10:37 sell meets 10:35 (down): aligned, open.
    assert per_trade["aligned"].to_list() == [True, True, True, True]
    assert per_trade["won"].to_list() == [True, False, False, None]
    assert per_trade["result"].to_list()[:3] == pytest.approx([30.0, -20.0, -10.0]) and per_trade["result"][3] is None
    row = summary.row(0, named=True)
    assert (row["trades"], row["aligned"], row["divergent"]) == (4, 4, 0)
    assert row["win_rate_aligned"] == pytest.approx(1 / 3) and row["hit_rate"] == pytest.approx(1 / 3)
    # Flip the model: every trade is divergent, the losers become the prediction's hits.
    flipped = _predictions().with_columns((1 - pl.col("prob_up")).alias("prob_up"))
    _, summary = predictions_vs_trades(_trades(), flipped)
    row = summary.row(0, named=True)
    assert (row["aligned"], row["divergent"]) == (0, 4) and row["win_rate_divergent"] == pytest.approx(1 / 3)
    assert row["hit_rate"] == pytest.approx(2 / 3)


def test_a_prediction_is_used_only_once_its_bar_closed_and_while_fresh():
    trades = _trades().filter(pl.col("position_id") == 100)  # opens 10:07
    preds = _predictions()
    later = preds.with_columns(pl.col("prob_up").alias("p")).filter(pl.col("close_ts") <= datetime(2024, 3, 4, 10, 5, tzinfo=UTC))
    per_trade, _ = predictions_vs_trades(trades, later)
    assert per_trade["close_ts"].to_list() == [datetime(2024, 3, 4, 10, 5, tzinfo=UTC)]
    stale = preds.filter(pl.col("close_ts") <= datetime(2024, 3, 4, 9, 55, tzinfo=UTC))  # 12 minutes old: beyond 2 bars
    per_trade, summary = predictions_vs_trades(trades, stale)
    assert per_trade.height == 0


def _vendor_bars(start: datetime, minutes: int) -> pl.DataFrame:
    ts = [start + timedelta(minutes=m) for m in range(minutes)]
    close = np.array([1.1 + m * 1e-5 for m in range(minutes)])
    frame = pl.DataFrame({"symbol": "EURUSD", "timeframe": "M1", "ts": ts, "open": close, "high": close + 1e-5,
                          "low": close - 1e-5, "close": close, "bid_close": close - 5e-5, "ask_close": close + 5e-5,
                          "volume": 0.0, "tick_count": 10, "quote_count": 10, "spread_mean": 0.0001, "spread_max": 0.0002,
                          "vwap": close, "source": "test"})
    return frame.cast(BAR_SCHEMA).with_columns((pl.col("ts").dt.truncate("1d") + timedelta(days=1)).alias("covered_until"))


def test_the_broker_assets_on_the_warehouse(warehouse):
    start = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    quotes = []
    for minute in range(60):
        mid = 1.1 + minute * 1e-5 + 0.00002
        for k in range(2):
            quotes.append({"server": "s", "symbol": "EURUSD", "ts": start + timedelta(minutes=minute, seconds=5 + 30 * k),
                           "bid": mid - 0.0001, "ask": mid + 0.0001})  # 2 pips against the vendor's 1
    write_quotes(warehouse, pl.DataFrame(quotes))
    bars = _vendor_bars(start, 60)
    days = sorted({d.date() for d in bars["ts"].to_list()})
    write_bars(warehouse, "EURUSD", days, bars)
    # the model's out-of-sample predictions, stored as a training stores them (one committed model version)
    preds = _predictions().with_columns(pl.col("ts", "close_ts") + (start - datetime(2024, 3, 4, 10, 0, tzinfo=UTC)))
    preds = preds.with_columns(pl.col("ts", "close_ts").dt.cast_time_unit("ms"), pl.col("fold").cast(pl.Int16),
                               pl.col("model_version").cast(pl.UInt32), run_id=pl.lit("r1"), label=pl.lit(1.0),
                               prob_down=1 - pl.col("prob_up"), prob_flat=pl.lit(None, pl.Float64))
    warehouse.replace(TableWrite("model_predictions", "model_name = 'lgbm'", {}, preds.select(PREDICTION_COLUMNS),
                                 [PARTITIONED["model_predictions"].scope("lgbm", 3)]))
    trades = _trades().with_columns(pl.col("ts") + (start - datetime(2024, 3, 4, 10, 0, tzinfo=UTC)))
    write_trades(warehouse, trades.with_columns(login=pl.lit(1), server=pl.lit("s"), order_ticket=pl.col("deal"), volume=pl.lit(0.1),
                                                units=pl.lit(10_000.0), price=pl.lit(1.1), magic=pl.lit(0), reason=pl.lit("client"),
                                                comment=pl.lit(""), client_id=pl.lit(None, pl.String)))
    result = materialize([broker_quotes_m1, broker_vs_vendor, predictions_vs_user_trades], resources={"warehouse": warehouse},
                         instance=DagsterInstance.ephemeral(), selection=None)
    assert result.success
    meta = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()}
    assert meta["broker_quotes_m1"]["dagster/row_count"].value == 60
    assert read_quote_minutes(warehouse).height == 60
    assert meta["broker_vs_vendor"]["minutes_compared"].value == 60
    assert meta["broker_vs_vendor"]["spread_ratio"].value == {"EURUSD": 2.0}
    assert "| EURUSD |" in meta["broker_vs_vendor"]["price_deviation"].value
    assert meta["predictions_vs_user_trades"]["trades"].value == 4
    summary = meta["predictions_vs_user_trades"]["summary"].value
    assert "| lgbm | 3 | M5 | direction_1h | 4 | 4 | 0 |" in summary
    # a rerun rolls the same quotes up again: still one row per minute
    again = materialize([broker_quotes_m1], resources={"warehouse": warehouse}, instance=DagsterInstance.ephemeral())
    assert again.success and read_quote_minutes(warehouse).height == 60
