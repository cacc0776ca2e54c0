"""The trading engine's parts and the engine itself: state machine, ids, fills, sizing, limits,
kill switch, currency conversion, save/restore, and the block run equal to bar-by-bar calls."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from models.backtest.runner import BacktestConfig, run_backtest
from models.market.instruments import instrument
from models.trading.broker import AckStatus, BrokerEvent, BrokerTimeout, SubmitAck
from models.trading.currency import ConvMode, asof_rates, conversion_mode, cross_pair
from models.trading.engine import BarBlock, EngineConfig, TradingEngine
from models.trading.fills import FillConfig, SimulatedBroker, half_spreads, market_price, trigger_price
from models.trading.orders import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    Order,
    OrderEvent,
    OrderState,
    OrderType,
    Side,
    client_order_id,
    next_state,
)
from models.trading.risk import EntryContext, KillSwitch, RiskConfig, RiskModel, Sizing, mean_true_range, true_ranges
from models.trading.strategy import DonchianBreakout, ModelStrategy, SmaCross, causality_violations

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


# -- orders ------------------------------------------------------------------------------------
def test_every_transition_of_the_table_and_every_other_pair_is_illegal():
    legal = illegal = 0
    for state in OrderState:
        for event in OrderEvent:
            if (state, event) in TRANSITIONS:
                assert next_state(state, event) is TRANSITIONS[(state, event)]
                legal += 1
            else:
                with pytest.raises(IllegalTransition):
                    next_state(state, event)
                illegal += 1
    assert legal == len(TRANSITIONS) and legal + illegal == len(OrderState) * len(OrderEvent)
    for state in TERMINAL:  # nothing leaves a terminal state
        assert not [e for (s, e) in TRANSITIONS if s is state]
    # the paths that matter
    assert next_state(OrderState.SUBMITTED, OrderEvent.TIMEOUT) is OrderState.UNKNOWN
    assert next_state(OrderState.UNKNOWN, OrderEvent.FILL) is OrderState.FILLED
    assert next_state(OrderState.SUBMITTED, OrderEvent.FILL) is OrderState.FILLED  # fill overtakes the ack
    assert next_state(OrderState.PENDING_CANCEL, OrderEvent.CANCEL_REJECT) is OrderState.ACCEPTED
    with pytest.raises(IllegalTransition):
        next_state(OrderState.CANCELLED, OrderEvent.FILL)
    with pytest.raises(IllegalTransition):
        next_state(OrderState.UNKNOWN, OrderEvent.SUBMIT)  # an unanswered order is never resent


def test_an_order_records_its_path_and_refuses_an_illegal_event():
    order = Order("x", "EURUSD", Side.BUY, OrderType.MARKET, 1000, "entry", T0)
    for event in (OrderEvent.SUBMIT, OrderEvent.ACCEPT, OrderEvent.PARTIAL_FILL, OrderEvent.FILL):
        order.apply(event)
    assert order.state is OrderState.FILLED and [s for _, s in order.history][-1] == "filled"
    with pytest.raises(IllegalTransition):
        order.apply(OrderEvent.CANCEL)
    assert Order.from_dict(json.loads(json.dumps(order.to_dict()))) == order


def test_client_ids_are_deterministic_and_distinct_per_decision():
    a = client_order_id("sma_cross", "EURUSD", T0, "entry")
    assert a == client_order_id("sma_cross", "EURUSD", T0, "entry") and len(a) <= 31
    others = {client_order_id("sma_cross", "EURUSD", T0, "exit"), client_order_id("sma_cross", "EURUSD", T0 + H, "entry"),
              client_order_id("sma_cross", "GBPUSD", T0, "entry"), client_order_id("other", "EURUSD", T0, "entry")}
    assert a not in others and len(others) == 4


# -- fills -------------------------------------------------------------------------------------
def test_market_fills_pay_half_the_spread_and_slippage():
    assert market_price(1, 1.1000, 0.0001, 0.00002) == pytest.approx(1.10012)
    assert market_price(-1, 1.1000, 0.0001, 0.00002) == pytest.approx(1.09988)


def test_spread_from_the_bars_own_bid_ask_else_configured():
    bid = np.array([1.0999, np.nan, 1.1000, 1.1002])
    ask = np.array([1.1001, 1.1003, 1.1000, 1.1006])  # a missing bid, a locked quote
    np.testing.assert_allclose(half_spreads(bid, ask, 4, 0.0004), [0.0001, 0.0002, 0.0002, 0.0002])
    np.testing.assert_allclose(half_spreads(None, None, 2, 0.0004), [0.0002, 0.0002])


def test_stops_and_limits_inside_a_bar_and_gaps_at_the_open():
    # sell stop at 99: touched inside the bar -> the stop level less slippage
    assert trigger_price(-1, OrderType.STOP, 99.0, 100.0, 101.0, 98.5, 0.1, 0.05, True) == (pytest.approx(98.95), "stop")
    # the open (bid 97.9) is already through the stop: a gap fills at the open, worse than the stop
    assert trigger_price(-1, OrderType.STOP, 99.0, 98.0, 98.5, 97.0, 0.1, 0.05, True) == (pytest.approx(97.85), "gap")
    # buy stop triggers on the ask: high 100.95 + 0.1 >= 101
    assert trigger_price(1, OrderType.STOP, 101.0, 100.0, 100.95, 99.5, 0.1, 0.0, True) == (101.0, "stop")
    assert trigger_price(1, OrderType.STOP, 101.0, 100.0, 100.85, 99.5, 0.1, 0.0, True) is None
    # a sell limit filled at its level, or better at a gapped open
    assert trigger_price(-1, OrderType.LIMIT, 102.0, 100.0, 102.2, 99.0, 0.1, 0.0, True) == (102.0, "limit")
    assert trigger_price(-1, OrderType.LIMIT, 102.0, 103.0, 103.5, 102.5, 0.1, 0.0, True) == (pytest.approx(102.9), "gap")


def _position_with_bracket(sl: float, tp: float):
    spec = replace(instrument("EURUSD"), contract_size=1.0, lot_step=1.0, min_lot=1.0)
    broker = SimulatedBroker({"EURUSD": spec})
    entry = Order("e", "EURUSD", Side.BUY, OrderType.MARKET, 10, "entry", T0)
    broker.submit(entry)
    broker.submit(Order("sl", "EURUSD", Side.SELL, OrderType.STOP, 10, "sl", T0, price=sl, reduce_only=True, parent_id="e"))
    broker.submit(Order("tp", "EURUSD", Side.SELL, OrderType.LIMIT, 10, "tp", T0, price=tp, reduce_only=True, parent_id="e"))
    events = broker.advance("EURUSD", T0 + H, 100.0, 100.5, 99.5, 100.0, 0.0, 1.0)
    assert [(e.kind, e.client_id) for e in events] == [(OrderEvent.FILL, "e")]
    return broker


def test_stop_wins_when_stop_and_target_are_touched_in_one_bar():
    broker = _position_with_bracket(sl=98.0, tp=102.0)
    events = broker.advance("EURUSD", T0 + 2 * H, 100.0, 103.0, 97.0, 100.0, 0.0, 1.0)
    assert [(e.kind, e.client_id) for e in events] == [(OrderEvent.FILL, "sl"), (OrderEvent.CANCEL, "tp")]
    assert events[0].fill.price == 98.0 and broker.positions() == {}


def test_a_gap_through_the_stop_fills_at_the_open_and_a_gap_through_the_target_wins_the_open():
    broker = _position_with_bracket(sl=98.0, tp=102.0)
    events = broker.advance("EURUSD", T0 + 2 * H, 96.0, 103.0, 95.0, 100.0, 0.0, 1.0)
    assert events[0].client_id == "sl" and events[0].fill.price == 96.0 and events[0].fill.reason == "gap"
    broker = _position_with_bracket(sl=98.0, tp=102.0)
    events = broker.advance("EURUSD", T0 + 2 * H, 103.0, 104.0, 97.0, 100.0, 0.0, 1.0)  # the open came first
    assert events[0].client_id == "tp" and events[0].fill.price == 103.0


def test_the_broker_is_idempotent_by_client_id():
    broker = _position_with_bracket(sl=98.0, tp=102.0)
    again = broker.submit(Order("e", "EURUSD", Side.BUY, OrderType.MARKET, 10, "entry", T0))
    assert "duplicate" in again.reason and broker.positions() == {"EURUSD": 10}
    assert broker.advance("EURUSD", T0 + 2 * H, 100.0, 100.5, 99.5, 100.0, 0.0, 1.0) == []


# -- sizing and limits -------------------------------------------------------------------------
def _ctx(**kw) -> EntryContext:
    base = dict(symbol="EURUSD", side=1, price=1.1, conv=1.0, atr=0.001, equity=100_000.0, prob=0.6)
    return EntryContext(**{**base, **kw})


def test_fixed_fraction_at_an_atr_stop():
    model = RiskModel(RiskConfig(risk_fraction=0.01, stop_atr=2.0, target_atr=3.0))
    d = model.evaluate_entry(_ctx(), instrument("EURUSD"))
    # 1% of 100,000 = 1,000 at a 0.002 stop -> 500,000 units = 5 lots
    assert d.approved and d.lots == 5.0 and d.qty == 500_000
    assert d.stop == pytest.approx(1.098) and d.target == pytest.approx(1.103) and d.risk == pytest.approx(1000.0)
    assert "fixed fraction 1.00%" in d.reason
    # rounded down to the lot step: 0.0021 stop -> 4.7619 lots -> 4.76
    assert model.evaluate_entry(_ctx(atr=0.00105), instrument("EURUSD")).lots == 4.76


def test_kelly_is_capped_and_refuses_no_edge():
    model = RiskModel(RiskConfig(sizing=Sizing.KELLY, kelly_multiplier=0.5, kelly_cap=0.02, stop_atr=1.0, target_atr=2.0))
    d = model.evaluate_entry(_ctx(prob=0.6), instrument("EURUSD"))  # f* = 0.6 - 0.4/2 = 0.4; half = 0.2 -> cap 2%
    assert d.approved and d.risk == pytest.approx(2000.0, rel=1e-3) and "cap 2.00%" in d.reason
    small = model.evaluate_entry(_ctx(prob=0.35), instrument("EURUSD"))  # f* = 0.025 -> 1.25%
    assert small.risk == pytest.approx(1250.0, rel=1e-2)
    none = model.evaluate_entry(_ctx(prob=0.3), instrument("EURUSD"))
    assert not none.approved and "no edge" in none.reason
    assert not model.evaluate_entry(_ctx(prob=None), instrument("EURUSD")).approved


@pytest.mark.parametrize(("config", "ctx", "reason"), [
    (RiskConfig(max_open_positions=2), {"other_positions": 2}, "open positions limit"),
    (RiskConfig(max_orders=3), {"orders_in_window": 3}, "order rate limit"),
    (RiskConfig(risk_fraction=0.05, max_margin_usage=0.5), {}, "margin"),
    (RiskConfig(), {"atr": None}, "not enough history for ATR"),
    (RiskConfig(stop_atr=None), {}, "needs a stop"),
    (RiskConfig(risk_fraction=1e-6), {}, "below the minimum"),
    (RiskConfig(), {"kill": KillSwitch.REDUCE_ONLY}, "kill switch: reduce_only"),
    (RiskConfig(), {"kill": KillSwitch.HALT}, "kill switch: halt"),
])
def test_each_limit_rejects_with_its_reason(config, ctx, reason):
    d = RiskModel(config).evaluate_entry(_ctx(**ctx), instrument("EURUSD"))
    assert not d.approved and reason in d.reason


def test_exposure_limits_clip_the_size_and_say_so():
    d = RiskModel(RiskConfig(max_symbol_exposure=2.0)).evaluate_entry(_ctx(), instrument("EURUSD"))
    assert d.approved and d.lots == 1.81 and "clipped by symbol exposure" in d.reason  # 200,000 / 110,000 per lot
    g = RiskModel(RiskConfig(max_gross_exposure=3.0)).evaluate_entry(_ctx(other_notional=250_000), instrument("EURUSD"))
    assert g.lots == 0.45 and "gross exposure" in g.reason
    assert RiskModel(RiskConfig(max_lots_per_symbol=1.5)).evaluate_entry(_ctx(), instrument("EURUSD")).lots == 1.5


def test_exits_pass_reduce_only_and_stop_at_halt():
    model = RiskModel()
    assert model.evaluate_exit(KillSwitch.REDUCE_ONLY).approved
    assert not model.evaluate_exit(KillSwitch.HALT).approved


def test_atr_is_the_mean_true_range_of_the_window():
    high, low, close = np.array([10, 11, 12.0]), np.array([9, 10, 10.5]), np.array([9.5, 10.5, 11.0])
    ranges = true_ranges(high, low, close, np.nan).tolist()
    assert ranges == [1.0, 1.5, 1.5]  # max(h-l, |h-pc|, |l-pc|); the first bar has no previous close
    assert mean_true_range(ranges, 2) == 1.5 and mean_true_range(ranges, 3, end=2) is None
    assert mean_true_range(ranges, 2, end=2) == 1.25


# -- currency ----------------------------------------------------------------------------------
def _bars(closes, symbol="EURUSD", opens=None, spread=None, start=T0, step=H) -> pl.DataFrame:
    closes = np.asarray(closes, dtype=float)
    opens = closes if opens is None else np.asarray(opens, dtype=float)
    frame = pl.DataFrame({
        "symbol": symbol, "timeframe": "H1", "ts": pl.Series(start + step * np.arange(len(closes))).cast(pl.Datetime("ms", "UTC")),
        "open": opens, "high": np.maximum(opens, closes), "low": np.minimum(opens, closes), "close": closes,
    })
    if spread is not None:
        frame = frame.with_columns(bid_close=pl.col("close") - spread / 2, ask_close=pl.col("close") + spread / 2)
    return frame


class _Script(SmaCross):
    """Sides given by hand, bar by bar (None: no decision)."""

    name = "script"
    defaults = {"sides": ()}

    def __init__(self, **params):
        super(SmaCross, self).__init__(**params)

    def signals(self, bars):
        sides = list(self.params["sides"]) + [None] * (bars.height - len(self.params["sides"]))
        return pl.DataFrame({"side": sides[:bars.height], "confidence": 1.0, "prob": None},
                            schema={"side": pl.Float64, "confidence": pl.Float64, "prob": pl.Float64})


def _lots(n: float) -> BacktestConfig:
    return BacktestConfig(risk=RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=n, stop_atr=None), fill=FillConfig(spread=0.0))


def test_usdjpy_pnl_is_converted_at_the_closing_rate():
    bars = _bars([150.0, 150.0, 151.0, 151.0], "USDJPY")
    result = run_backtest(bars, _Script(sides=[1, None, -0.0 + 0]), _lots(1.0))
    trade = result.trades.row(0, named=True)
    # 100,000 USD bought at 150.00, sold at 151.00: 100,000 JPY, worth 100,000 / 151 USD
    assert trade["pnl"] == pytest.approx(100_000 * 1.0 / 151.0)
    assert result.metrics["final_equity"] == pytest.approx(100_000 + 100_000 / 151.0)
    assert conversion_mode(instrument("USDJPY"), "USD") is ConvMode.INVERSE


def test_eurgbp_pnl_is_converted_with_gbpusd_known_at_the_time():
    bars = _bars([0.85, 0.85, 0.86, 0.86], "EURGBP")
    gbpusd = _bars([1.25, 1.26, 1.27, 1.30], "GBPUSD")
    result = run_backtest(bars, _Script(sides=[1, None, 0]), _lots(1.0), rates={"GBPUSD": gbpusd})
    # sold at bar 3's open (0.86); GBP -> USD known at that open is bar 2's GBPUSD close, 1.27
    assert result.trades["pnl"][0] == pytest.approx(100_000 * 0.01 * 1.27)
    # unrealised at bar 2's close: 0.01 GBP per unit at 1.27
    assert result.equity["equity"][2] == pytest.approx(100_000 + 1_000 * 1.27)
    assert cross_pair("GBP", "USD") == ("GBPUSD", False) and cross_pair("JPY", "USD") == ("USDJPY", True)
    with pytest.raises(ValueError, match="needs GBPUSD"):
        run_backtest(bars, _Script(sides=[1]), _lots(1.0))
    np.testing.assert_allclose(asof_rates(np.array([5, 10, 11]), np.array([10, 20]), np.array([1.0, 2.0]), False), [np.nan, 1.0, 1.0])


# -- the engine --------------------------------------------------------------------------------
def _walk(n=600, seed=5, start=T0):
    rng = np.random.default_rng(seed)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    opens = np.r_[1.1, close[:-1]] * np.exp(rng.normal(0, 0.0005, n))
    bars = _bars(close, opens=opens, start=start, spread=0.0002)
    wick = np.abs(rng.normal(0, 0.001, n))
    return bars.with_columns(high=pl.col("high") * (1 + wick), low=pl.col("low") * (1 - wick))


RISKY = RiskConfig(risk_fraction=0.02, stop_atr=1.5, target_atr=2.5, max_daily_loss=0.03, max_drawdown=0.08,
                   max_orders=6, order_window_minutes=600)


class _AskedEveryBar(SimulatedBroker):
    """The same broker, declared not bar-driven: the engine then takes the full step on every
    bar, as it does with a live broker (the reference for the quick path)."""

    bar_driven = False


def _engine(strategy="donchian", risk=RISKY, broker_class=SimulatedBroker):
    spec = instrument("EURUSD")
    broker = broker_class({"EURUSD": spec}, FillConfig(commission_per_lot=3.5, slippage=0.00001))
    return TradingEngine(EngineConfig(strategy), RiskModel(risk), broker, {"EURUSD": spec}), broker


def _block(bars, strategy=DonchianBreakout(window=10)):
    return BarBlock.build(bars, strategy.signals(bars), instrument("EURUSD").spread)


def _fingerprint(engine):
    return ([o.to_dict() for o in engine.orders.values()], [f.to_dict() for f in engine.fills],
            [t.to_dict() for t in engine.portfolio.trades], engine.portfolio.balance, engine.kill.value)


def test_a_block_run_with_quiet_bars_skipped_equals_full_steps_bar_by_bar():
    bars = _walk(3000)
    block = _block(bars, SmaCross(fast=10, slow=50))
    fast, _ = _engine(risk=replace(RISKY, max_orders=None))
    whole = fast.run("EURUSD", block)
    slow, _ = _engine(risk=replace(RISKY, max_orders=None), broker_class=_AskedEveryBar)
    equity = []
    for i in range(len(block)):
        equity.append(slow.run("EURUSD", block.slice(i, i + 1)).equity[0])
    assert _fingerprint(fast) == _fingerprint(slow)
    reasons = [t.exit_reason for t in fast.portfolio.trades]
    # the quick path carried most bars, and stops and targets hit inside the bars it skipped
    assert fast.steps < len(block) / 3 and slow.steps == len(block)
    assert reasons.count("stop_loss") > 5 and reasons.count("take_profit") > 5 and "kill_switch" in reasons
    np.testing.assert_array_equal(whole.equity, np.array(equity))


def test_long_and_short_blocks_skip_the_same_bars():
    """The quiet-bar test has two forms, numpy over a long block and a Python loop over short
    ones (the live runner's single bars): the same bars take the step, with the same results."""
    bars = _walk(3000)
    block = _block(bars, SmaCross(fast=10, slow=50))
    whole_engine, _ = _engine(risk=replace(RISKY, max_orders=None))
    whole = whole_engine.run("EURUSD", block)
    pieces_engine, _ = _engine(risk=replace(RISKY, max_orders=None))
    pieces = [pieces_engine.run("EURUSD", block.slice(i, i + 40)).equity for i in range(0, len(block), 40)]
    assert _fingerprint(whole_engine) == _fingerprint(pieces_engine)
    assert whole_engine.steps == pieces_engine.steps < len(block) / 3
    assert whole_engine._peak == pieces_engine._peak and whole_engine.snapshot() == pieces_engine.snapshot()
    np.testing.assert_array_equal(whole.equity, np.concatenate(pieces))
    # Halted: a refused side is not asked again until something changes, in both forms.
    block = _block(bars)  # a breakout says the same side on many bars in a row
    halted = []
    for size in (len(block), 40):
        engine, _ = _engine(risk=replace(RISKY, max_orders=None))
        engine.set_kill_switch(KillSwitch.HALT, "test")
        for i in range(0, len(block), size):
            engine.run("EURUSD", block.slice(i, i + size))
        halted.append(engine)
    assert halted[0].steps == halted[1].steps < len(block) / 10 and not halted[0].orders
    assert [(e.ts, e.reason) for e in halted[0].risk_events] == [(e.ts, e.reason) for e in halted[1].risk_events]


def test_on_bar_makes_the_same_decisions_as_the_block():
    bars = _walk(200)
    strategy = DonchianBreakout(window=10)
    signals = strategy.signals(bars)
    fast, _ = _engine()
    fast.run("EURUSD", _block(bars, strategy))
    live, _ = _engine()
    for bar, signal in zip(bars.iter_rows(named=True), signals.iter_rows(named=True)):
        live.on_bar("EURUSD", bar, signal)
    assert _fingerprint(fast) == _fingerprint(live)
    replay = live.on_bar("EURUSD", bars.row(-1, named=True), {"side": 1.0})
    assert replay.risk_events[-1].reason.startswith("1 bar(s) at or before") and not replay.orders and not replay.fills
    assert live.reconcile() == {}


def test_restore_mid_run_gives_the_uninterrupted_result():
    bars = _walk()
    block = _block(bars)
    whole, _ = _engine()
    expected = whole.run("EURUSD", block).equity
    first, broker = _engine()
    head = first.run("EURUSD", block.slice(0, 317)).equity
    saved = json.loads(json.dumps({"engine": first.snapshot(), "broker": broker.snapshot()}))
    second, broker2 = _engine()
    broker2.restore(saved["broker"])
    second.restore(saved["engine"])
    tail = second.run("EURUSD", block.slice(317, len(block))).equity
    assert _fingerprint(second) == _fingerprint(whole)
    np.testing.assert_array_equal(np.r_[head, tail], expected)


def test_a_replayed_decision_is_never_a_second_order():
    bars = _bars([1.10, 1.10, 1.11, 1.12], opens=[1.10, 1.10, 1.11, 1.12])
    block = BarBlock.build(bars, _Script(sides=[None, 1]).signals(bars), 0.0)
    engine, broker = _engine(risk=RiskConfig(stop_atr=None, sizing=Sizing.FIXED_LOTS, fixed_lots=1))
    engine.run("EURUSD", block.slice(0, 1))
    saved = json.loads(json.dumps(engine.snapshot()))
    engine.run("EURUSD", block.slice(1, 2))  # decides and sends the entry, then "crashes"
    restarted, _ = _engine(risk=RiskConfig(stop_atr=None, sizing=Sizing.FIXED_LOTS, fixed_lots=1))
    restarted.broker = broker  # the broker lived on
    restarted.restore(saved)
    restarted.run("EURUSD", block.slice(1, 4))  # the same bar again: the same id, the broker knows it
    assert len(broker._orders) == 1 and broker.positions() == {"EURUSD": 100_000}
    assert next(iter(broker._orders)) == client_order_id("donchian", "EURUSD", int(block.ts[1]), "entry")


def test_the_drawdown_limit_trips_the_kill_switch_and_flattens():
    closes = [1.10] * 3 + list(np.linspace(1.10, 1.00, 30))
    bars = _bars(closes)
    risk = RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=5, stop_atr=None, max_drawdown=0.05)
    result = run_backtest(bars, _Script(sides=[1, None, None, None, 1, 1, 1]), replace(_lots(5), risk=risk))
    events = result.risk_events
    limit = events.filter(pl.col("kind") == "limit")
    assert limit.height == 1 and "drawdown limit" in limit["reason"][0]
    assert result.trades["exit_reason"][0] == "kill_switch"
    assert result.engine.kill is KillSwitch.HALT
    # once halted, later signals are refused with the reason
    assert events.filter((pl.col("kind") == "entry") & ~pl.col("approved"))["reason"].str.contains("halt").all()
    # flattened at the next open (one bar of 1.6% after the 5% line), not at the bottom (-45%)
    assert -0.075 < result.metrics["max_drawdown"] < -0.05
    assert result.equity["equity"].tail(20).n_unique() == 1


def test_the_daily_loss_limit_halts_for_the_day_only():
    day = 24 * H
    closes = [1.10, 1.10, 1.08, 1.07, 1.07, 1.07] + [1.07] * 20 + [1.08, 1.09]
    bars = _bars(closes)
    risk = RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=5, stop_atr=None, max_daily_loss=0.05, breach_action=KillSwitch.REDUCE_ONLY)
    sides = [1] + [None] * 25 + [1]
    result = run_backtest(bars, _Script(sides=sides), replace(_lots(5), risk=risk))
    kinds = result.risk_events.filter(pl.col("kind") == "kill_switch")["reason"].to_list()
    assert any("daily loss limit" in r for r in kinds) and any("lifted: a new day" in r for r in kinds)
    entries = result.risk_events.filter(pl.col("kind") == "entry")
    assert entries["approved"].to_list() == [True, True]  # the next day trades again
    assert int(entries["ts"].dt.epoch("ms")[1]) >= T0 + day


def test_halt_refuses_exits_and_reduce_only_allows_them():
    bars = _bars([1.10] * 6)
    for mode, exit_ok in ((KillSwitch.HALT, False), (KillSwitch.REDUCE_ONLY, True)):
        engine, broker = _engine(risk=RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None))
        block = BarBlock.build(bars, _Script(sides=[1, None, -1, None, None, 1]).signals(bars), 0.0)
        engine.run("EURUSD", block.slice(0, 2))
        engine.set_kill_switch(mode, "test")
        engine.run("EURUSD", block.slice(2, 6))
        exits = [e for e in engine.risk_events if e.kind == "exit"]
        assert exits[0].approved is exit_ok
        assert not [e for e in engine.risk_events if e.kind == "entry" and e.approved and e.ts > T0 + H]
        assert broker.positions() == ({} if exit_ok else {"EURUSD": 100_000})


class _SilentBroker(SimulatedBroker):
    """Takes the order but does not answer (a timeout), as a live broker may."""

    bar_driven = False

    def submit(self, order):
        super().submit(order)
        raise BrokerTimeout("no answer within 2 s")


def test_an_unanswered_order_is_unknown_until_the_broker_is_asked_and_never_resent():
    spec = instrument("EURUSD")
    broker = _SilentBroker({"EURUSD": spec})
    engine = TradingEngine(EngineConfig("t"), RiskModel(RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None)),
                           broker, {"EURUSD": spec})
    engine.on_bar("EURUSD", {"ts": T0, "open": 1.1, "high": 1.1, "low": 1.1, "close": 1.1}, {"side": 1.0})
    (order,) = engine.orders.values()
    assert order.state is OrderState.UNKNOWN
    engine.on_bar("EURUSD", {"ts": T0 + H, "open": 1.1, "high": 1.1, "low": 1.1, "close": 1.1}, {"side": 1.0})
    assert order.state is OrderState.FILLED and len(engine.orders) == 1 and len(broker._orders) == 1
    assert any("settled by asking the broker" in e.reason for e in engine.risk_events)


# -- strategies --------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [SmaCross(fast=5, slow=20), DonchianBreakout(window=15, exit_window=5), ModelStrategy()])
def test_strategies_are_causal(strategy):
    bars = _walk(300).with_columns(prob_up=pl.Series(np.random.default_rng(1).uniform(0.3, 0.7, 300)))
    assert causality_violations(strategy, bars, list(range(40, 300, 37))) == []


def test_model_strategy_thresholds():
    bars = pl.DataFrame({"prob_up": [0.7, 0.5, 0.3, None, 0.55]})
    out = ModelStrategy(long_above=0.55, short_below=0.45).signals(bars)
    assert out["side"].to_list() == [1.0, 0.0, -1.0, None, 1.0]
    assert out["prob"].to_list()[:3] == [0.7, None, pytest.approx(0.7)]
    assert out["confidence"][0] == pytest.approx(0.4)


def test_several_symbols_share_one_account_and_its_limits():
    eur = _bars([1.10, 1.10, 1.12, 1.12, 1.12, 1.12], "EURUSD")
    jpy = _bars([150.0, 150.0, 151.0, 151.0, 151.0, 151.0], "USDJPY")
    # both want to be long from bar 0; only one position may be open; EURUSD exits at bar 3
    sides = {"EURUSD": [1, None, None, 0], "USDJPY": [1, None, None, None, 1]}

    class PerSymbol(_Script):
        def signals(self, bars):
            return _Script(sides=sides[bars["symbol"][0]]).signals(bars)

    risk = RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None, max_open_positions=1)
    result = run_backtest(pl.concat([eur, jpy]), PerSymbol(sides=[]), replace(_lots(1), risk=risk))
    entries = result.risk_events.filter(pl.col("kind") == "entry").sort("ts", "symbol")
    assert entries.select("symbol", "approved").rows() == [("EURUSD", True), ("USDJPY", False), ("USDJPY", True)]
    assert "open positions limit" in entries["reason"][1]
    assert result.equity.height == 6  # one row per timestamp, both symbols marked
    # EURUSD bought at 1.10 (bar 1 open), sold at 1.12 (bar 4 open): 2,000 USD
    assert result.trades.filter(pl.col("symbol") == "EURUSD")["pnl"][0] == pytest.approx(2_000.0)
    assert result.equity["equity"][3] == pytest.approx(102_000.0)
    # margin per bar: 1 lot of EURUSD at 1.12 with 30:1 leverage while it is held
    assert result.equity["margin"][2] == pytest.approx(100_000 * 1.12 / 30)


def test_flatten_cancels_an_entry_on_its_way_and_closes_positions():
    bars = _bars([1.10] * 4)
    engine, broker = _engine(risk=RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None))
    block = BarBlock.build(bars, _Script(sides=[1]).signals(bars), 0.0)
    engine.run("EURUSD", block.slice(0, 1))  # the entry is sent, not yet filled
    engine.set_kill_switch(KillSwitch.HALT, "operator", flatten=True)
    (entry,) = engine.orders.values()
    assert entry.state is OrderState.PENDING_CANCEL
    engine.run("EURUSD", block.slice(1, 4))
    assert entry.state is OrderState.CANCELLED and broker.positions() == {} and not engine.fills
    engine2, broker2 = _engine(risk=RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None))
    engine2.run("EURUSD", block.slice(0, 2))  # filled at bar 1's open
    engine2.set_kill_switch(KillSwitch.HALT, "operator", flatten=True)
    engine2.run("EURUSD", block.slice(2, 4))
    assert broker2.positions() == {} and engine2.portfolio.trades[0].exit_reason == "kill_switch"


class _LateBroker(SimulatedBroker):
    """Answers a submit later, as an event, as a live broker may."""

    bar_driven = False

    def submit(self, order):
        ack = super().submit(order)
        self._events.append(BrokerEvent(OrderEvent.ACCEPT, order.client_id, -1))
        return SubmitAck(AckStatus.PENDING)


def test_a_late_answer_keeps_the_order_submitted_until_the_event_comes():
    spec = instrument("EURUSD")
    engine = TradingEngine(EngineConfig("t"), RiskModel(RiskConfig(sizing=Sizing.FIXED_LOTS, fixed_lots=1, stop_atr=None)),
                           _LateBroker({"EURUSD": spec}), {"EURUSD": spec})
    engine.on_bar("EURUSD", {"ts": T0, "open": 1.1, "high": 1.1, "low": 1.1, "close": 1.1}, {"side": 1.0})
    (order,) = engine.orders.values()
    assert order.state is OrderState.SUBMITTED
    report = engine.on_bar("EURUSD", {"ts": T0 + H, "open": 1.1, "high": 1.1, "low": 1.1, "close": 1.1}, None)
    assert [e for e, _ in order.history] == [OrderEvent.SUBMIT, OrderEvent.ACCEPT, OrderEvent.FILL]
    assert report.orders == [order] and report.fills[0].client_id == order.client_id and engine.reconcile() == {}
    engine.broker._pos["EURUSD"] = 0.0  # the broker says otherwise (a position closed by hand)
    assert engine.reconcile() == {"EURUSD": (100_000.0, 0.0)}


def test_drawdown_duration_from_peak_to_recovery():
    from models.backtest.metrics import drawdown_duration

    ts = np.arange(8) * 86_400_000
    equity = np.array([100, 110, 105, 100, 108, 111, 109, 112.0])
    assert drawdown_duration(ts, equity) == (4.0, 4)  # 110 on day 1, back above on day 5


def test_apply_follows_the_table_for_every_pair_and_records_it():
    """Order.apply reads a table derived from TRANSITIONS (with shared history entries): it must
    agree with the table on every pair and leave an order untouched by an illegal event."""
    for (state, event), target in TRANSITIONS.items():
        order = Order("x", "EURUSD", Side.BUY, OrderType.MARKET, 1000, "entry", T0, state=state)
        assert order.apply(event) is target and order.state is target and order.history == [(event, target)]
    for state in OrderState:
        for event in OrderEvent:
            if (state, event) not in TRANSITIONS:
                order = Order("x", "EURUSD", Side.BUY, OrderType.MARKET, 1000, "entry", T0, state=state)
                with pytest.raises(IllegalTransition):
                    order.apply(event)
                assert order.state is state and order.history == []


class _Recounted(TradingEngine):
    """The engine, checking after every order it sends that its quick bookkeeping of the
    symbol's working orders (a market order only counted) equals a full recount."""

    checked = 0

    def _submit(self, order, st, ts):
        sent = super()._submit(order, st, ts)
        kept = (st.working_market, st.up_ask, st.dn_ask, st.up_bid, st.dn_bid, set(st.live))
        self._refresh(st)
        assert kept == (st.working_market, st.up_ask, st.dn_ask, st.up_bid, st.dn_bid, set(st.live)), order.client_id
        self.checked += 1
        return sent


def test_the_working_order_count_kept_on_submit_equals_a_full_recount():
    bars = _walk(3000)
    block = _block(bars, SmaCross(fast=10, slow=50))
    spec = instrument("EURUSD")
    broker = SimulatedBroker({"EURUSD": spec}, FillConfig(commission_per_lot=3.5, slippage=0.00001))
    engine = _Recounted(EngineConfig("sma"), RiskModel(RISKY), broker, {"EURUSD": spec})
    engine.run("EURUSD", block.slice(0, 1500))
    engine.set_kill_switch(KillSwitch.REDUCE_ONLY, "test", flatten=True)  # cancels entries, sends a flatten order
    engine.set_kill_switch(KillSwitch.OFF, "test over")
    engine.run("EURUSD", block.slice(1500, 3000))
    reasons = [t.exit_reason for t in engine.portfolio.trades]
    assert engine.checked > 50 and {"stop_loss", "take_profit", "kill_switch"} <= set(reasons), (engine.checked, set(reasons))


def test_equity_sums_the_positions_in_symbol_order_whichever_traded_first():
    """The live runner warms up symbol by symbol and a backtest bar by bar, so their positions
    appear in different orders; the same account must still give the same float (parity)."""
    import itertools

    specs = {s: instrument(s) for s in ("BTCUSD", "EURUSD", "XAUUSD")}
    book = {"BTCUSD": (4.81, 21758.855000000003, 21771.77), "EURUSD": (-105000.0, 1.0062000000000002, 1.0059),
            "XAUUSD": (44.0, 2370.8950000000004, 2371.74)}

    def equity(order: tuple[str, ...]) -> float:
        engine = TradingEngine(EngineConfig("eq"), RiskModel(RiskConfig()), SimulatedBroker(specs, FillConfig()), specs)
        engine.portfolio.balance = 100_013.5771
        for symbol in order:
            position = engine.portfolio.position(symbol)
            position.units, position.avg = book[symbol][:2]
            state = engine._state(symbol)
            state.last_close, state.last_conv = book[symbol][2], 1.0
        return engine.equity()

    def in_order(order: tuple[str, ...]) -> float:
        total = 100_013.5771
        for s in order:
            total += book[s][0] * (book[s][2] - book[s][1])
        return total

    assert len({in_order(o) for o in itertools.permutations(book)}) > 1  # these marks round differently in another order
    assert len({equity(order) for order in itertools.permutations(book)}) == 1


def test_the_model_strategy_signal_of_one_value_is_the_row_signals_gives():
    values = [None, float("nan"), 0.0, 0.2, 0.45, 0.4500001, 0.5, 0.55, 0.5499999, 0.9, 1.0, -0.003, 0.003]
    for params in ({}, {"exit_between": False}, {"long_above": 0.6, "short_below": 0.4},
                   {"column": "prediction", "long_above": 0.001, "short_below": -0.001}):
        strategy = ModelStrategy(**params)
        column = strategy.params["column"]
        frame = strategy.signals(pl.DataFrame({column: values}, schema={column: pl.Float64}))
        for value, row in zip(values, frame.iter_rows(named=True)):
            mine = strategy.signal(value)
            assert mine == row or all(a == b or (a != a and b != b) for a, b in zip(mine.values(), row.values())), (params, value)
            assert mine.keys() == row.keys() and all(v is None or type(v) is float for v in mine.values())


def test_one_bar_block_is_the_block_build_makes_of_a_one_row_frame():
    from datetime import UTC, datetime

    bars = [{"ts": datetime(2024, 3, 4, 10, 5, tzinfo=UTC), "open": 1.1, "high": 1.2, "low": 1.0, "close": 1.15,
             "bid_close": 1.1499, "ask_close": 1.1501},
            {"ts": 1709546700000, "open": 1.1, "high": 1.2, "low": 1.0, "close": 1.15, "bid_close": None, "ask_close": 1.1501},
            {"ts": datetime(2024, 3, 4, 10, 5, 0, 999_000, tzinfo=UTC), "open": 2, "high": 3, "low": 1, "close": 2}]
    signals = [None, {"side": 1.0, "confidence": 0.3, "prob": 0.65}, {"side": None, "confidence": None, "prob": None},
               {"side": -1.0}]
    for bar in bars:
        for signal in signals:
            for conv in (None, np.array([0.9])):
                frame = pl.DataFrame([bar])
                sig = None if signal is None else pl.DataFrame(
                    {"side": [signal.get("side")], "confidence": [signal.get("confidence", 1.0)], "prob": [signal.get("prob")]},
                    schema={"side": pl.Float64, "confidence": pl.Float64, "prob": pl.Float64})
                built, one = BarBlock.build(frame, sig, 0.0002, conv), BarBlock.one(bar, signal, 0.0002, conv)
                for name in built.__dataclass_fields__:
                    a, b = getattr(built, name), getattr(one, name)
                    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (bar, signal, name, a, b)
