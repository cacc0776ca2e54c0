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


# -- external updates (resources/bus/external.py) -------------------------------------------------
def _update():
    import polars as pl

    from resources.bus.external import ExternalUpdate

    ms = pl.Datetime("ms", "UTC")
    values = pl.DataFrame({"known_at": [datetime(2024, 3, 5, 5, tzinfo=UTC), datetime(2024, 3, 6, 5, tzinfo=UTC)],
                           "name": ["fred_fedfunds", "commodity_gold_ret_1d"], "value": [5.33, -0.0125]}).with_columns(
        pl.col("known_at").cast(ms))
    events = pl.DataFrame({"ts": [datetime(2024, 3, 7, 13, 30, tzinfo=UTC)], "known_at": [datetime(2024, 3, 1, tzinfo=UTC)],
                           "currency": ["USD"], "impact": ["high"], "actual": [None], "forecast": [200.0]},
                          schema_overrides={"actual": pl.Float64}).with_columns(pl.col("ts", "known_at").cast(ms))
    return ExternalUpdate(datetime(2024, 3, 6, 6, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC),
                          datetime(2024, 4, 6, tzinfo=UTC), values, events)


def test_an_external_update_round_trips_and_replaces_only_its_window():
    import numpy as np
    import polars as pl

    from models.features.external import ExternalData
    from resources.bus.external import ExternalUpdate

    update = _update()
    payload = update.encode()
    back = ExternalUpdate.decode(payload)
    assert (back.read_at, back.since, back.events_until) == (update.read_at, update.since, update.events_until)
    assert back.values.equals(update.values) and back.events.equals(update.events)
    assert update.msg_id(payload) == back.msg_id(back.encode())  # the same content, the same message
    # held before: a value known before the window (kept), one inside it (replaced), an event inside it (replaced)
    ms = pl.Datetime("ms", "UTC")
    held = ExternalData(
        pl.DataFrame({"known_at": [datetime(2024, 2, 20, tzinfo=UTC), datetime(2024, 3, 4, tzinfo=UTC)],
                      "name": ["fred_fedfunds", "fred_fedfunds"], "value": [5.31, 9.99]}).with_columns(pl.col("known_at").cast(ms)),
        pl.DataFrame({"ts": [datetime(2024, 3, 7, 13, 30, tzinfo=UTC)], "known_at": [datetime(2024, 3, 1, tzinfo=UTC)],
                      "surprise": [0.5]}).with_columns(pl.col("ts", "known_at").cast(ms)))
    merged = back.apply(held, ("EUR", "USD"))
    at = np.array([int(datetime(2024, 3, 4, 12, tzinfo=UTC).timestamp() * 1000), int(datetime(2024, 3, 8, tzinfo=UTC).timestamp() * 1000)])
    assert merged.values_at(at)["fred_fedfunds"].tolist() == [5.31, 5.33]  # 9.99 was replaced by the newer read
    assert merged.values_at(at)["commodity_gold_ret_1d"][1] == -0.0125
    assert merged.events["surprise"].to_list() == [None]  # the event as read now: no actual yet
    assert back.apply(held, ("JPY",)).events.is_empty()  # another symbol's currencies: not its event
    # rows outside its window (a value known before since, an event scheduled before it) replace nothing, add nothing
    before = datetime(2024, 2, 25, 13, 30, tzinfo=UTC)
    kept = ExternalData(held.values, pl.concat([held.events, pl.DataFrame(
        {"ts": [before], "known_at": [before], "surprise": [0.2]}).with_columns(pl.col("ts", "known_at").cast(ms))]))
    stray = ExternalUpdate(back.read_at, back.since, back.events_until, pl.concat([back.values, pl.DataFrame(
        {"known_at": [datetime(2024, 2, 26, tzinfo=UTC)], "name": ["fred_fedfunds"], "value": [7.0]}).with_columns(
            pl.col("known_at").cast(ms))]), pl.concat([back.events, back.events.with_columns(
                ts=pl.lit(before).cast(ms), known_at=pl.lit(before).cast(ms), actual=pl.lit(300.0))]))
    merged = stray.apply(kept, ("EUR", "USD"))
    assert merged.events.sort("ts")["surprise"].to_list() == [0.2, None]
    assert merged.values_at(at)["fred_fedfunds"].tolist() == [5.31, 5.33]


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d.pop("since"), "since is epoch milliseconds"),
    (lambda d: d.update(read_at=True), "read_at is epoch milliseconds"),
    (lambda d: d.update(values={}), "needs the lists values and events"),
    (lambda d: d["values"].append([1, "fred_made_up", 1.0]), "'fred_made_up' is not a registered external feature"),
    (lambda d: d["values"].append([1, "fred_fedfunds"]), "a value row is [known_at, name, value]"),
    (lambda d: d["values"].append([1, "fred_fedfunds", "5.3"]), "'fred_fedfunds' is a finite number or null"),
    (lambda d: d["values"].append([1, "fred_fedfunds", 10**400]), "'fred_fedfunds' is a finite number or null"),
    (lambda d: d["events"].append([1, 2, "USD", "high", 1e308 * 10, 1.0]), "'actual' is a finite number or null"),
    (lambda d: d["events"].append([1, 2, "USD", None, 1.0, 1.0]), "currency and impact are text"),
    (lambda d: d["events"].append([-5, 2, "USD", "high", 1.0, 1.0]), "event ts is epoch milliseconds"),
])
def test_an_external_update_a_runner_must_not_take_is_refused_with_its_reason(change, reason):
    import json

    from resources.bus.external import ExternalUpdate

    data = json.loads(_update().encode())
    change(data)
    with pytest.raises(BadMessage, match=reason.replace("[", r"\[").replace("]", r"\]")):
        ExternalUpdate.decode(json.dumps(data).encode())
    with pytest.raises(BadMessage, match="not JSON"):
        ExternalUpdate.decode(b"\xff")
    with pytest.raises(BadMessage, match="not JSON"):  # an integer of thousands of digits
        ExternalUpdate.decode(b'{"read_at": ' + b"9" * 5000 + b"}")
