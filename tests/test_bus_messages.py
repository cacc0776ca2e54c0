"""The bar wire format: what a publisher writes, a runner reads back exactly; anything a runner
must not act on is refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from resources.bus.messages import BadMessage, bar_msg_id, decode_bar, encode_bar

BAR = {"symbol": "EURUSD", "timeframe": "M5", "ts": datetime(2024, 3, 6, 10, 5, tzinfo=UTC),
       "close_ts": datetime(2024, 3, 6, 10, 10, tzinfo=UTC), "open": 1.0851, "high": 1.0856, "low": 1.0849,
       "close": 1.0853, "bid_close": 1.08525, "ask_close": 1.08535, "volume": 0.0, "tick_count": 412, "quote_count": 412,
       "spread_mean": 0.00009, "spread_max": 0.0002, "vwap": 1.0852, "source": "polygon"}


def test_a_bar_round_trips_with_epoch_milliseconds():
    bar = decode_bar(encode_bar(BAR), "bars.EURUSD.M5")
    assert bar["ts"] == 1709719500000 and bar["close_ts"] == 1709719800000
    assert {k: v for k, v in bar.items() if k not in ("ts", "close_ts")} == {
        k: v for k, v in BAR.items() if k not in ("ts", "close_ts")}
    assert bar_msg_id("EURUSD", "M5", bar["ts"]) == "bar:EURUSD:M5:1709719500000"


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (encode_bar({**BAR, "timeframe": "M7"}), "malformed"),
    (encode_bar({k: v for k, v in BAR.items() if k != "vwap"}).replace(b'"vwap":null,', b""), "malformed"),
    (encode_bar({**BAR, "symbol": "XAUUSD"}), "wrong_subject"),
    (encode_bar({**BAR, "close": float("nan")}).replace(b"NaN", b"NaN"), "impossible"),
    (encode_bar({**BAR, "low": 0.0}), "impossible"),
    (encode_bar({**BAR, "high": 1.0850}), "impossible"),
    (encode_bar({**BAR, "close_ts": BAR["ts"]}), "impossible"),
    (encode_bar({**BAR, "volume": -1.0}), "impossible"),
    # wrong types and absurd values: refused with a reason, never a TypeError or polars error later
    (encode_bar({**BAR, "timeframe": ["M5"]}), "malformed"),
    (encode_bar({**BAR, "symbol": {"a": 1}}), "malformed"),
    (encode_bar({**BAR, "source": 7}), "malformed"),
    (encode_bar({**BAR, "open": "1.0851"}), "malformed"),
    (encode_bar({**BAR, "vwap": True}), "malformed"),
    (encode_bar({**BAR, "bid_close": [1.0]}), "malformed"),
    (encode_bar({**BAR, "ts": 10**17, "close_ts": 10**17 + 300_000}), "impossible"),
    (encode_bar({**BAR, "ts": -300_000, "close_ts": 0}), "impossible"),
    (encode_bar({**BAR, "ts": 1709719500000.0}), "malformed"),
    (encode_bar({**BAR, "tick_count": 10**20}), "impossible"),
    (encode_bar({**BAR, "quote_count": 2**32}), "impossible"),
    (encode_bar({**BAR, "tick_count": 1.5}), "impossible"),
    (encode_bar({**BAR, "tick_count": -1}), "impossible"),
    (encode_bar({**BAR, "high": 10**400}), "impossible"),
    (encode_bar({**BAR, "bid_close": 0.0}), "impossible"),
    (encode_bar({**BAR, "ask_close": -1.0}), "impossible"),
    (encode_bar({**BAR, "bid_close": 1.0854, "ask_close": 1.0853}), "impossible"),
])
def test_a_bar_a_runner_must_not_act_on_is_refused_with_its_reason(payload, reason):
    with pytest.raises(BadMessage) as refused:
        decode_bar(payload, "bars.EURUSD.M5")
    assert refused.value.reason == reason
