"""MT5Broker on the fake terminal: every class of return code, lost answers (never a second
order), netting and hedging, partial fills, stops and the stops level, the lot step, the
engine driven through it, reconciliation, and the packaging's one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from models.market.instruments import instrument
from models.trading.broker import AckStatus, BrokerTimeout
from models.trading.engine import EngineConfig, TradingEngine
from models.trading.ledger import Ledger
from models.trading.orders import Order, OrderEvent, OrderState, OrderType, Side, client_order_id
from models.trading.risk import RiskConfig, RiskModel
from resources.brokers.mt5 import constants as C
from resources.brokers.mt5.broker import MT5Broker, MT5Config, MT5Error, MT5Unavailable, load_mt5_module, magic_number
from resources.brokers.mt5.fake import FakeTerminal
from tests.conftest import ROOT

T0 = 1_709_546_400_000  # 2024-03-04 10:00 UTC
BID, ASK = 1.08500, 1.08502
MAGIC = 4242
HEDGING, NETTING = C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING, C.ACCOUNT_MARGIN_MODE_RETAIL_NETTING


def _terminal(margin_mode: int = HEDGING, offset_s: int = 7200, **symbol: object) -> FakeTerminal:
    fake = FakeTerminal(margin_mode=margin_mode, commission_per_lot=7.0, start_ms=T0, server_utc_offset_s=offset_s)
    fake.add_symbol("EURUSD", **symbol)
    fake.add_symbol("GBPUSD")
    fake.initialize()
    fake.set_quote("EURUSD", BID, ASK, T0)
    fake.set_quote("GBPUSD", 1.27000, 1.27003, T0)
    return fake


def _broker(fake: FakeTerminal, **config: object) -> MT5Broker:
    settings = {"magic": MAGIC, "symbols": ("EURUSD", "GBPUSD"), "server_utc_offset_s": None, **config}
    broker = MT5Broker(fake, MT5Config(**settings), clock=fake.utc_now, sleep=lambda s: None)
    broker.connect()
    return broker


def _market(n: int, side: Side = Side.BUY, qty: float = 100_000.0, sl: float | None = None, tp: float | None = None,
            symbol: str = "EURUSD") -> Order:
    return Order(client_order_id("test", symbol, T0 + n, "entry"), symbol, side, OrderType.MARKET, qty, "entry", T0 + n,
                 stop_loss=sl, take_profit=tp)


def _child(parent: Order, kind: str, level: float) -> Order:
    side = Side(-int(parent.side))
    return Order(client_order_id("test", parent.symbol, parent.bar_ts, kind), parent.symbol, side,
                 OrderType.STOP if kind == "sl" else OrderType.LIMIT, parent.qty, kind, parent.bar_ts, price=level,
                 reduce_only=True, parent_id=parent.client_id)


def _exit(n: int, side: Side, qty: float, symbol: str = "EURUSD") -> Order:
    return Order(client_order_id("test", symbol, T0 + n, "exit"), symbol, side, OrderType.MARKET, qty, "exit", T0 + n,
                 reduce_only=True)


def _sends(fake: FakeTerminal, client_id: str | None = None) -> int:
    return sum(1 for name, r in fake.calls if name == "order_send" and (client_id is None or r.comment == client_id))


def _events(broker: MT5Broker, symbol: str = "EURUSD") -> list:
    return broker.advance(symbol, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


# -- connection and packaging -------------------------------------------------------------------
def test_connect_reads_the_margin_mode_and_measures_the_server_time_zone():
    fake = _terminal(NETTING, offset_s=10_800)
    broker = _broker(fake)
    assert broker.hedging is False and broker.offset_s == 10_800 and broker.account_currency == "USD"
    assert fake.symbol_info("GBPUSD").select  # selected in Market Watch
    ack = broker.submit(_market(1))
    fill = _events(broker)[0].fill
    assert ack.status is AckStatus.ACCEPTED and fill.ts == T0  # deal times come back in UTC
    assert fake.history_deals_get(0, 2**31)[0].time_msc == T0 + 10_800_000  # the server stamps its own time


def test_a_wrong_login_and_a_dead_terminal_are_one_clear_line():
    fake = _terminal()
    broker = MT5Broker(fake, MT5Config(magic=MAGIC, symbols=("EURUSD",)), clock=fake.utc_now)
    with pytest.raises(Exception, match=r"cannot start the MetaTrader 5 terminal: Terminal: Authorization failed \(-6\)"):
        broker.connect(login=1, password="wrong", server="FakeBroker-Demo")
    fake.kill_ipc()
    with pytest.raises(Exception, match=r"cannot start the MetaTrader 5 terminal: IPC initialize failed \(-10003\)$"):
        broker.connect()


def test_a_login_that_is_not_an_account_number_is_one_line_naming_mt5_login(monkeypatch):
    fake = _terminal()
    broker = MT5Broker(fake, MT5Config(magic=MAGIC, symbols=("EURUSD",)), clock=fake.utc_now)
    monkeypatch.setenv("MT5_LOGIN", "demo-account")
    with pytest.raises(MT5Error) as failed:
        broker.connect_from_environment()
    assert str(failed.value).startswith("MT5_LOGIN must be the account number") and "\n" not in str(failed.value)
    assert "demo-account" not in str(failed.value)
    monkeypatch.setenv("MT5_LOGIN", "")  # unset: the terminal's own account
    broker.connect_from_environment()
    assert broker._connected_at > 0 and broker.hedging


def test_the_package_is_imported_only_when_chosen_and_linux_gets_one_line():
    code = ("import sys; import resources.brokers.mt5.broker, resources.brokers.mt5.fake; "
            "assert 'dagster' not in sys.modules and 'MetaTrader5' not in sys.modules; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "clean", out.stderr
    with pytest.raises(MT5Unavailable) as raised:
        load_mt5_module()
    assert "\n" not in str(raised.value) and "only for Windows" in str(raised.value)


def test_magic_numbers_are_stable_per_strategy():
    assert magic_number("sma_cross") == magic_number("sma_cross") != magic_number("model")
    assert 0 < magic_number("x") < 2**31


# -- done, placed, partial ------------------------------------------------------------------------
def test_a_market_order_with_stops_is_one_deal_with_the_levels_on_the_position():
    fake = _terminal()
    broker = _broker(fake)
    entry = _market(1, sl=1.08300, tp=1.08900)
    assert broker.submit(entry).status is AckStatus.ACCEPTED
    assert broker.submit(_child(entry, "sl", 1.08300)).status is AckStatus.ACCEPTED
    assert broker.submit(_child(entry, "tp", 1.08900)).status is AckStatus.ACCEPTED
    (position,) = fake.positions_get()
    assert (position.volume, position.sl, position.tp, position.magic, position.comment) == (1.0, 1.083, 1.089, MAGIC, entry.client_id)
    request = fake.calls[0][1]
    assert request.type_filling == C.ORDER_FILLING_FOK and request.deviation == 10 and request.price == ASK
    (event,) = _events(broker)
    assert event.kind is OrderEvent.FILL and event.fill.qty == 100_000 and event.fill.price == ASK
    assert event.fill.commission == pytest.approx(7.0) and event.fill.fill_id.startswith("mt5-")
    assert _sends(fake) == 1  # the children cost no request: they are the position's levels
    assert _events(broker) == []  # reported once


def test_a_pending_limit_order_is_placed_then_filled_when_the_ask_reaches_it():
    fake = _terminal()
    broker = _broker(fake)
    order = Order("tf00000000000000a1", "EURUSD", Side.BUY, OrderType.LIMIT, 50_000.0, "entry", T0, price=1.08400,
                  stop_loss=1.08200)
    assert broker.submit(order).status is AckStatus.ACCEPTED
    (pending,) = fake.orders_get()
    assert pending.type == C.ORDER_TYPE_BUY_LIMIT and pending.price_open == 1.084 and pending.sl == 1.082
    assert _events(broker) == []
    fake.set_quote("EURUSD", 1.08380, 1.08382, T0 + 60_000, continuous=True)  # the ask passes 1.08400
    (event,) = _events(broker)
    assert (event.fill.price, event.fill.qty, event.fill.reason) == (1.084, 50_000.0, "limit")
    assert fake.positions_get()[0].sl == 1.082 and fake.orders_get() == ()


def test_a_pending_order_is_cancelled_and_a_market_order_cannot_be():
    fake = _terminal()
    broker = _broker(fake)
    stop = Order("tf00000000000000b1", "EURUSD", Side.SELL, OrderType.STOP, 10_000.0, "entry", T0, price=1.08000)
    broker.submit(stop)
    assert broker.cancel(stop.client_id).status is AckStatus.ACCEPTED
    assert fake.orders_get() == () and fake.history_orders_get(ticket=fake.calls[0][1].order or 100_001)[0].state == C.ORDER_STATE_CANCELED
    assert [e.kind for e in _events(broker)] == [OrderEvent.CANCEL]
    market = _market(2)
    broker.submit(market)
    assert broker.cancel(market.client_id).status is AckStatus.REJECTED  # it executed at once; its fill settles it


@pytest.mark.parametrize("flags, filling", [(C.SYMBOL_FILLING_IOC, C.ORDER_FILLING_IOC), (0, C.ORDER_FILLING_RETURN)],
                         ids=["ioc", "return"])
def test_partial_fills(flags, filling):
    fake = _terminal(filling_mode=flags)
    broker = _broker(fake)
    fake.set_liquidity("EURUSD", 0.4)
    order = _market(1, qty=100_000.0)
    assert broker.submit(order).status is AckStatus.ACCEPTED
    assert fake.calls[0][1].type_filling == filling
    events = _events(broker)
    assert events[0].kind is OrderEvent.FILL and events[0].fill.qty == 40_000
    if filling == C.ORDER_FILLING_IOC:  # the rest is cancelled by the server
        assert [e.kind for e in events] == [OrderEvent.FILL, OrderEvent.CANCEL]
        assert "only 0.4 of 1.0 lots filled" in events[1].reason
        assert broker.order_status(order.client_id).state is OrderState.CANCELLED
    else:  # the rest keeps working and fills when liquidity returns
        assert len(events) == 1 and broker.order_status(order.client_id).state is OrderState.PARTIALLY_FILLED
        fake.set_liquidity("EURUSD", None)
        fake.set_quote("EURUSD", BID, ASK, T0 + 1_000)
        (rest,) = _events(broker)
        assert rest.fill.qty == 60_000 and broker.order_status(order.client_id).state is OrderState.FILLED
    assert _sends(fake) == 1


def test_fill_or_kill_without_the_liquidity_is_rejected_with_the_servers_reason():
    fake = _terminal()
    broker = _broker(fake)
    fake.set_liquidity("EURUSD", 0.5)
    ack = broker.submit(_market(1))
    assert ack.status is AckStatus.REJECTED and "TRADE_RETCODE_REJECT (10006)" in ack.reason and "liquidity" in ack.reason
    assert fake.positions_get() == ()


# -- retries at a fresh price --------------------------------------------------------------------
@pytest.mark.parametrize("code", [C.TRADE_RETCODE_REQUOTE, C.TRADE_RETCODE_PRICE_CHANGED, C.TRADE_RETCODE_PRICE_OFF])
def test_a_requote_is_retried_at_the_fresh_price_within_the_bound(code):
    fake = _terminal()
    broker = _broker(fake, price_retries=3)
    fake.requote(times=2, retcode=code, move_points=4)
    order = _market(1)
    ack = broker.submit(order)
    assert ack.status is AckStatus.ACCEPTED
    sends = [r for name, r in fake.calls if name == "order_send"]
    assert len(sends) == 3 and [r.price for r in sends] == pytest.approx([ASK, ASK + 4e-5, ASK + 8e-5])
    assert _events(broker)[0].fill.price == pytest.approx(ASK + 8e-5)  # filled at the fresh price
    assert len(fake.positions_get()) == 1


def test_requotes_beyond_the_bound_reject_and_place_nothing():
    fake = _terminal()
    broker = _broker(fake, price_retries=3)
    fake.requote(times=10)
    ack = broker.submit(_market(1))
    assert ack.status is AckStatus.REJECTED and ack.reason.startswith("TRADE_RETCODE_REQUOTE (10004)")
    assert "after 3 fresh-price retries" in ack.reason
    assert _sends(fake) == 4 and fake.positions_get() == ()


# -- outcome unknown: never a second order ----------------------------------------------------------
@pytest.mark.parametrize("answer", ["none", "timeout", "connection"])
def test_a_timeout_after_execution_never_produces_a_second_order(answer):
    fake = _terminal()
    broker = _broker(fake)
    fake.lose_answer(after_execution=True, answer=answer)
    order = _market(1, sl=1.08300)
    ack = broker.submit(order)
    assert ack.status is AckStatus.ACCEPTED and "found in the history by client id" in ack.reason
    (event,) = _events(broker)
    assert event.kind is OrderEvent.FILL and event.fill.qty == 100_000
    assert broker.submit(order).status is AckStatus.ACCEPTED  # the engine asks again: still one order
    assert _sends(fake, order.client_id) == 1 and len(fake.positions_get()) == 1 and len(fake.deals) == 1


def test_the_engine_with_a_lost_answer_books_one_position():
    fake = _terminal(offset_s=0)
    broker = _broker(fake)
    engine = TradingEngine(EngineConfig("lost"), RiskModel(RiskConfig(sizing="fixed_lots", fixed_lots=0.3, stop_atr=None)),
                           broker, {"EURUSD": instrument("EURUSD")})
    fake.lose_answer(after_execution=True)
    bar = {"ts": T0, "open": 1.085, "high": 1.0852, "low": 1.0849, "close": 1.08501}
    engine.on_bar("EURUSD", bar, {"side": 1})
    (order,) = engine.orders.values()
    assert order.state is OrderState.ACCEPTED  # found in the history: not unknown, not resent
    engine.on_bar("EURUSD", {**bar, "ts": T0 + 60_000}, {"side": 1})
    assert order.state is OrderState.FILLED and engine.portfolio.position("EURUSD").units == 30_000
    assert engine.reconcile() == {} and _sends(fake) == 1


def test_a_request_that_never_arrived_stays_unknown_and_is_never_resent():
    fake = _terminal(offset_s=0)
    broker = _broker(fake, unknown_grace_s=30)
    engine = TradingEngine(EngineConfig("lost"), RiskModel(RiskConfig(sizing="fixed_lots", fixed_lots=0.3, stop_atr=None)),
                           broker, {"EURUSD": instrument("EURUSD")})
    fake.lose_answer(after_execution=False)
    bar = {"ts": T0, "open": 1.085, "high": 1.0852, "low": 1.0849, "close": 1.08501}
    engine.on_bar("EURUSD", bar, {"side": 1})
    (order,) = engine.orders.values()
    assert order.state is OrderState.UNKNOWN
    fake.advance_time(10_000)
    engine.on_bar("EURUSD", {**bar, "ts": T0 + 60_000}, {})  # asked: not in the history yet, still unknown
    assert order.state is OrderState.UNKNOWN
    fake.advance_time(30_000)
    engine.on_bar("EURUSD", {**bar, "ts": T0 + 120_000}, {})  # past the grace: it never reached the server
    assert order.state is OrderState.REJECTED and "never received" in order.reason
    assert _sends(fake, order.client_id) == 1 and fake.positions_get() == ()


def test_a_request_executed_after_its_answer_was_lost_is_found_when_asked():
    fake = _terminal()
    broker = _broker(fake)
    fake.execute_late()
    order = _market(1)
    with pytest.raises(BrokerTimeout, match="not in the history yet: not resent"):
        broker.submit(order)
    fake.set_quote("EURUSD", BID, ASK, T0 + 500)  # the server gets to it
    status = broker.order_status(order.client_id)
    assert status.state is OrderState.FILLED and status.filled_qty == 100_000
    assert _events(broker)[0].fill.qty == 100_000 and _sends(fake, order.client_id) == 1 and len(fake.deals) == 1


def test_a_request_executed_after_it_was_given_up_halts_trading():
    """Not in the history within ``unknown_grace_s``: the order counts as never placed. Should the
    server execute it later all the same, the account books the fill (the money moved) but the
    order's record cannot take it (rejected is final): trading halts with the reason until a
    reconciliation (the runner's restart) has looked at the broker."""
    fake = _terminal(offset_s=0)
    broker = _broker(fake, unknown_grace_s=30.0)
    engine = _engine(broker)
    fake.execute_late()
    engine.on_bar("EURUSD", _bar(0), {"side": 1})
    (entry,) = [o for o in engine.orders.values() if o.intent == "entry"]
    assert entry.state is OrderState.UNKNOWN
    fake.advance_time(31_000)  # no quote: the request has not reached the server
    engine.reconcile()
    assert entry.state is OrderState.REJECTED and broker.halted is None
    fake.set_quote("EURUSD", BID, ASK, T0 + 32_000)  # the server executes it now
    engine.on_bar("EURUSD", _bar(1), {"side": 1})
    assert broker.halted and entry.client_id in broker.halted and "executed late" in broker.halted
    assert broker.positions() == {"EURUSD": 20_000.0} == {"EURUSD": engine.portfolio.position("EURUSD").units}
    assert entry.state is OrderState.REJECTED and entry.filled_qty == 20_000  # the fill on its record, the state final
    assert any(e.kind == "order" and "'rejected' cannot take event 'fill'" in e.reason for e in engine.risk_events)
    assert broker.submit(_market(9)).status is AckStatus.REJECTED and _sends(fake) == 1  # nothing more is sent
    assert engine.reconcile() == {}


def test_an_order_given_up_before_a_restart_and_executed_after_the_replays_claims_halts_trading():
    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake, unknown_grace_s=30.0))
    fake.execute_late()
    engine.on_bar("EURUSD", _bar(0), {"side": 1})
    fake.advance_time(31_000)
    engine.reconcile()  # not in the history after the grace: given up
    (entry,) = [o for o in engine.orders.values() if o.intent == "entry"]
    assert entry.state is OrderState.REJECTED
    snapshot = engine.snapshot()
    broker = _broker(fake, unknown_grace_s=30.0)  # the restart
    restarted = _engine(broker)
    restarted.restore(snapshot)
    assert broker.reconcile(Ledger.from_snapshot(snapshot)).ok
    restarted.on_broker_events(broker.drain_events())
    broker.check_claimed()  # after the replay's first bar: nothing of ours left unclaimed yet
    assert broker.halted is None
    fake.set_quote("EURUSD", BID, ASK, T0 + 32_000)  # the server executes it now
    restarted.on_bar("EURUSD", _bar(1), {"side": 0})
    assert broker.halted and entry.client_id in broker.halted and "does not trade" in broker.halted
    assert broker.submit(_market(9)).status is AckStatus.REJECTED and _sends(fake) == 1


def test_a_restart_does_not_take_a_partly_refused_close_for_a_late_execution():
    """A close split over two positions whose second leg the server refused is in the history as a
    rejected order with a deal of its first leg: a restart's reconciliation books it and trades on."""
    fake = _terminal(offset_s=0)
    broker = _broker(fake)
    a, b = _market(1, qty=10_000.0), _market(2, qty=50_000.0)
    assert broker.submit(a).status is AckStatus.ACCEPTED
    fake.advance_time(1000)
    assert broker.submit(b).status is AckStatus.ACCEPTED
    fake.set_liquidity("EURUSD", 0.2)  # leg 1 (0.1 lots) fits, leg 2 (0.5 lots) is refused (fill or kill)
    close = _exit(3, Side.SELL, 60_000.0)
    broker.submit(close)
    assert broker.halted is None and broker.positions() == {"EURUSD": 50_000.0}
    fake.set_liquidity("EURUSD", None)
    fake.advance_time(60_000)
    restarted = _broker(fake)
    report = restarted.reconcile(Ledger(positions={"EURUSD": 50_000.0}, symbols=("EURUSD",),
                                        known=frozenset({a.client_id, b.client_id, close.client_id}), as_of_ms=T0 + 120_000))
    assert report.ok, report.mismatches
    assert restarted.halted is None


def test_a_silent_terminal_leaves_the_order_unknown_until_it_answers():
    fake = _terminal()
    broker = _broker(fake)
    fake.lose_answer(after_execution=True)
    order = _market(1)
    real_send = fake.order_send

    def send_then_die(request):
        result = real_send(request)
        fake.kill_ipc()  # the lookup cannot be made
        return result

    fake.order_send = send_then_die
    with pytest.raises(BrokerTimeout, match="cannot tell whether"):
        broker.submit(order)
    with pytest.raises(BrokerTimeout, match="does not answer"):
        broker.order_status(order.client_id)
    fake.restore_ipc()
    assert broker.order_status(order.client_id).state is OrderState.FILLED and _sends(fake) == 1


def test_no_connection_to_the_trade_server_is_an_unknown_outcome_settled_by_the_history():
    fake = _terminal()
    broker = _broker(fake, unknown_grace_s=0, precheck=False)
    fake.disconnect()
    order = _market(1)
    checked = _broker(fake, precheck=True).submit(_market(2))  # order_check sees it first: not sent at all
    assert checked.status is AckStatus.REJECTED and checked.reason.startswith("TRADE_RETCODE_CONNECTION (10031)")
    with pytest.raises(BrokerTimeout, match=r"TRADE_RETCODE_CONNECTION \(10031\)"):
        broker.submit(order)
    fake.reconnect()
    assert broker.order_status(order.client_id) is None  # settled: never placed, and not resent
    assert _sends(fake) == 1 and fake.positions_get() == ()


# -- fatal codes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("precheck", [True, False], ids=["order_check", "order_send"])
@pytest.mark.parametrize("setup, label", [
    (lambda f: f.set_balance(1_000.0), "TRADE_RETCODE_NO_MONEY (10019)"),
    (lambda f: f.close_market("EURUSD"), "TRADE_RETCODE_MARKET_CLOSED (10018)"),
    (lambda f: f.set_trade_mode("EURUSD", C.SYMBOL_TRADE_MODE_DISABLED), "TRADE_RETCODE_TRADE_DISABLED (10017)"),
    (lambda f: f.set_trade_mode("EURUSD", C.SYMBOL_TRADE_MODE_CLOSEONLY), "TRADE_RETCODE_CLOSE_ONLY (10044)"),
], ids=["no_money", "market_closed", "trade_disabled", "close_only"])
def test_fatal_codes_reject_with_the_brokers_reason(setup, label, precheck):
    fake = _terminal()
    broker = _broker(fake, precheck=precheck)
    setup(fake)
    ack = broker.submit(_market(1))
    assert ack.status is AckStatus.REJECTED and ack.reason.startswith(label)
    assert fake.positions_get() == () and _sends(fake) == (0 if precheck else 1)
    assert broker.order_status(_market(1).client_id).state is OrderState.REJECTED


@pytest.mark.parametrize("code", [C.TRADE_RETCODE_INVALID, C.TRADE_RETCODE_INVALID_VOLUME, C.TRADE_RETCODE_INVALID_STOPS,
                                  C.TRADE_RETCODE_REJECT, C.TRADE_RETCODE_CLIENT_DISABLES_AT, C.TRADE_RETCODE_LIMIT_POSITIONS])
def test_every_other_refusal_is_final_and_not_retried(code):
    fake = _terminal()
    broker = _broker(fake, precheck=False)
    fake.fail_next(code, comment="server says no")
    ack = broker.submit(_market(1))
    assert ack.status is AckStatus.REJECTED and ack.reason == f"{C.retcode_label(code)}: server says no"
    assert _sends(fake) == 1


# -- netting and hedging -------------------------------------------------------------------------
def test_hedging_keeps_a_position_per_order_and_an_exit_closes_ours_by_ticket():
    fake = _terminal(HEDGING)
    broker = _broker(fake)
    fake.place_manual("EURUSD", C.ORDER_TYPE_BUY, 2.0)  # the trader's own position: never touched
    broker.submit(_market(1, qty=100_000))
    broker.submit(_market(2, qty=50_000))
    assert len(fake.positions_get()) == 3 and broker.positions() == {"EURUSD": 150_000.0}
    exit_ = _exit(3, Side.SELL, 150_000)
    assert broker.submit(exit_).status is AckStatus.ACCEPTED
    closes = [r for name, r in fake.calls if name == "order_send" and r.comment == exit_.client_id]
    assert [r.volume for r in closes] == [1.0, 0.5] and all(r.position for r in closes)  # oldest first, by ticket
    (manual,) = fake.positions_get()
    assert manual.magic == 0 and manual.volume == 2.0 and broker.positions() == {}
    fills = [e.fill for e in _events(broker) if e.fill and e.client_id == exit_.client_id]
    assert sum(f.qty for f in fills) == 150_000


def test_netting_nets_and_reverses_like_metatrader():
    fake = _terminal(NETTING)
    fake.initialize()
    base = {"action": C.TRADE_ACTION_DEAL, "symbol": "EURUSD", "type_filling": C.ORDER_FILLING_FOK, "magic": 1}
    fake.order_send({**base, "volume": 1.0, "type": C.ORDER_TYPE_BUY})
    fake.order_send({**base, "volume": 0.5, "type": C.ORDER_TYPE_BUY})
    (pos,) = fake.positions_get()
    assert pos.volume == 1.5 and pos.type == C.POSITION_TYPE_BUY
    fake.set_quote("EURUSD", 1.08600, 1.08602, T0 + 1000)
    fake.order_send({**base, "volume": 2.0, "type": C.ORDER_TYPE_SELL})  # closes 1.5 and opens 0.5 short
    (turned,) = fake.positions_get()
    assert turned.type == C.POSITION_TYPE_SELL and turned.volume == 0.5 and turned.identifier == pos.identifier
    entries = [d.entry for d in fake.deals]
    assert entries == [C.DEAL_ENTRY_IN, C.DEAL_ENTRY_IN, C.DEAL_ENTRY_INOUT]
    assert fake.deals[-1].profit == pytest.approx(round((1.086 - 1.08502) * 150_000, 2))


def test_netting_broker_round_trip():
    fake = _terminal(NETTING)
    broker = _broker(fake)
    broker.submit(_market(1, side=Side.SELL, qty=30_000))
    assert broker.positions() == {"EURUSD": -30_000.0}
    broker.submit(_exit(2, Side.BUY, 30_000))
    assert broker.positions() == {} and [d.entry for d in fake.deals] == [C.DEAL_ENTRY_IN, C.DEAL_ENTRY_OUT]
    assert [e.fill.price for e in _events(broker)] == [BID, ASK]


# -- stops, levels, one-cancels-other --------------------------------------------------------------
def test_stops_inside_the_stops_level_are_moved_out_to_it():
    fake = _terminal(stops_level=50)  # 50 points = 0.00050
    broker = _broker(fake)
    entry = _market(1, sl=BID - 0.00020, tp=BID + 0.00030)
    ack = broker.submit(entry)
    assert ack.status is AckStatus.ACCEPTED
    assert "stop loss moved from 1.0848 to 1.0845" in ack.reason and "take profit moved from 1.0853 to 1.0855" in ack.reason
    (position,) = fake.positions_get()
    assert (position.sl, position.tp) == (1.0845, 1.0855)


def test_stops_the_market_already_passed_refuse_the_entry_and_unadjusted_ones_are_refused_by_the_server():
    fake = _terminal(stops_level=50)
    broker = _broker(fake)
    ack = broker.submit(_market(1, sl=BID + 0.0001))
    assert ack.status is AckStatus.REJECTED and "already through the stop loss" in ack.reason and _sends(fake) == 0
    strict = _broker(_terminal(stops_level=50), adjust_stops=False, precheck=False)
    ack = strict.submit(_market(2, sl=BID - 0.0002))
    assert ack.status is AckStatus.REJECTED and ack.reason.startswith("TRADE_RETCODE_INVALID_STOPS (10016)")
    limit = Order("tf00000000000000c1", "EURUSD", Side.BUY, OrderType.LIMIT, 10_000.0, "entry", T0, price=ASK - 0.0001)
    ack = broker.submit(limit)
    assert ack.status is AckStatus.REJECTED and "within the stops level (50 points)" in ack.reason


def test_a_stop_hit_fills_the_stop_child_and_cancels_the_target():
    fake = _terminal()
    broker = _broker(fake)
    entry = _market(1, sl=1.08400, tp=1.08700)
    broker.submit(entry)
    sl, tp = _child(entry, "sl", 1.08400), _child(entry, "tp", 1.08700)
    broker.submit(sl)
    broker.submit(tp)
    _events(broker)
    fake.run_bar("EURUSD", T0 + 60_000, 1.08501, 1.08520, 1.08350, 1.08380, 0.00001)
    events = _events(broker)
    assert [(e.kind, e.client_id) for e in events] == [(OrderEvent.FILL, sl.client_id), (OrderEvent.CANCEL, tp.client_id)]
    assert events[0].fill.price == 1.084 and events[0].fill.reason == "stop" and events[1].reason == "sibling filled (OCO)"
    assert fake.deals[-1].reason == C.DEAL_REASON_SL and fake.deals[-1].comment == "[sl 1.08400]"


def test_an_exit_cancels_the_positions_stops():
    fake = _terminal()
    broker = _broker(fake)
    entry = _market(1, sl=1.08400, tp=1.08700)
    broker.submit(entry)
    sl, tp = _child(entry, "sl", 1.08400), _child(entry, "tp", 1.08700)
    broker.submit(sl)
    broker.submit(tp)
    _events(broker)
    broker.submit(_exit(2, Side.SELL, 100_000))
    kinds = [(e.kind, e.client_id, e.reason) for e in _events(broker)]
    assert kinds[1:] == [(OrderEvent.CANCEL, sl.client_id, "position closed"), (OrderEvent.CANCEL, tp.client_id, "position closed")]


def test_a_child_whose_entry_went_without_its_level_sets_it_on_the_position():
    fake = _terminal()
    broker = _broker(fake)
    entry = _market(1)
    broker.submit(entry)
    assert broker.submit(_child(entry, "sl", 1.08300)).status is AckStatus.ACCEPTED
    assert fake.positions_get()[0].sl == 1.083
    assert fake.calls[-1][1].action == C.TRADE_ACTION_SLTP


# -- lot step ------------------------------------------------------------------------------------
def test_volume_is_rounded_down_to_the_lot_step_and_bounded():
    fake = _terminal()
    broker = _broker(fake)
    order = _market(1, qty=12_345.0)
    ack = broker.submit(order)
    assert ack.status is AckStatus.ACCEPTED and "rounded down to the lot step 0.01: 0.12 lots" in ack.reason
    assert fake.calls[-1][1].volume == 0.12
    events = _events(broker)
    assert [e.kind for e in events] == [OrderEvent.FILL, OrderEvent.CANCEL] and events[0].fill.qty == 12_000
    assert "below the lot step" in events[1].reason
    small = broker.submit(_market(2, qty=400.0))
    assert small.status is AckStatus.REJECTED and "below EURUSD's minimum of 0.01 lots" in small.reason
    big = broker.submit(_market(3, qty=20_000_000.0))
    assert big.status is AckStatus.REJECTED and "above EURUSD's maximum of 100.0 lots" in big.reason
    assert _sends(fake) == 1
    assert broker.trading_spec("EURUSD").lot_step == 0.01 and broker.trading_spec("EURUSD").contract_size == 100_000


def test_a_client_id_longer_than_the_comment_limit_is_refused():
    broker = _broker(_terminal())
    order = _market(1)
    order.client_id = "x" * 32
    ack = broker.submit(order)
    assert ack.status is AckStatus.REJECTED and "31-character comment" in ack.reason


# -- reconciliation ------------------------------------------------------------------------------
def _engine(broker: MT5Broker) -> TradingEngine:
    return TradingEngine(EngineConfig("recon"), RiskModel(RiskConfig(sizing="fixed_lots", fixed_lots=0.2, stop_atr=None,
                                                                     stop_pct=0.002, target_pct=0.004)),
                         broker, {"EURUSD": instrument("EURUSD"), "GBPUSD": instrument("GBPUSD")})


def _bar(n: int, close: float = 1.08501) -> dict:
    return {"ts": T0 + n * 60_000, "open": close, "high": close + 0.0001, "low": close - 0.0001, "close": close}


def test_reconcile_explains_a_stop_hit_while_away_and_leaves_external_positions_alone():
    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake))
    engine.on_bar("EURUSD", _bar(0), {"side": 1})
    engine.on_bar("EURUSD", _bar(1), {"side": 1})
    assert engine.portfolio.position("EURUSD").units == 20_000
    snapshot = engine.snapshot()
    # the runner is down: the stop is hit, and the trader buys GBPUSD by hand
    fake.run_bar("EURUSD", T0 + 180_000, 1.08501, 1.08510, 1.08200, 1.08250, 0.00001)
    fake.place_manual("GBPUSD", C.ORDER_TYPE_BUY, 1.0)
    broker = _broker(fake)
    restarted = _engine(broker)
    restarted.restore(snapshot)
    report = broker.reconcile(Ledger.from_snapshot(snapshot))
    assert report.ok, report.summary()
    assert report.positions == {} and report.expected == {}
    assert len(report.explained) == 1 and "(sl) filled 20000 units while away" in report.explained[0]
    assert len(report.external) == 1 and report.external[0].startswith("GBPUSD buy 1.0 lots") and "by hand" in report.external[0]
    restarted.on_broker_events(broker.drain_events())
    assert restarted.reconcile() == {}
    assert restarted.portfolio.position("EURUSD").units == 0 and restarted.portfolio.trades[-1].exit_reason == "stop_loss"
    assert "external position(s) left alone" in report.summary()


def test_a_position_of_ours_closed_by_hand_halts_trading_with_a_clear_message():
    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake))
    engine.on_bar("EURUSD", _bar(0), {"side": 1})
    engine.on_bar("EURUSD", _bar(1), {"side": 1})
    snapshot = engine.snapshot()
    (position,) = fake.positions_get()
    fake.advance_time(120_000)
    fake.close_manual(position.ticket)
    broker = _broker(fake)
    report = broker.reconcile(Ledger.from_snapshot(snapshot))
    assert not report.ok
    assert any("was closed by hand in the terminal" in m for m in report.mismatches)
    assert report.summary().startswith("trading halted:")
    ack = broker.submit(_market(9))
    assert ack.status is AckStatus.REJECTED and ack.reason.startswith("trading halted") and _sends(fake) == 1


def test_an_order_sent_just_before_a_crash_is_claimed_by_the_replay_not_sent_again():
    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake))
    engine.on_bar("EURUSD", _bar(0), {})
    saved = engine.snapshot()  # the last state saved before the crash
    engine.on_bar("EURUSD", _bar(1), {"side": 1})  # the entry is sent and filled, then the runner dies
    entry_id = next(o.client_id for o in engine.orders.values() if o.intent == "entry")
    broker = _broker(fake)
    restarted = _engine(broker)
    restarted.restore(saved)
    report = broker.reconcile(Ledger.from_snapshot(saved))
    assert report.ok and report.unclaimed == [entry_id] and report.positions == {"EURUSD": 20_000.0}
    restarted.on_broker_events(broker.drain_events())
    restarted.on_bar("EURUSD", _bar(1), {"side": 1})  # the replay makes the same decision: same client id
    restarted.on_bar("EURUSD", _bar(2), {"side": 1})
    broker.check_claimed()
    assert broker.halted is None and broker.unclaimed() == []
    assert restarted.reconcile() == {} and restarted.portfolio.position("EURUSD").units == 20_000
    assert _sends(fake, entry_id) == 1 and len(fake.positions_get()) == 1


def test_an_unclaimed_order_after_the_replay_halts_trading():
    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake))
    engine.on_bar("EURUSD", _bar(0), {})
    saved = engine.snapshot()
    engine.on_bar("EURUSD", _bar(1), {"side": 1})
    broker = _broker(fake)
    broker.reconcile(Ledger.from_snapshot(saved))
    broker.check_claimed()  # the replay decided differently (another model?): nobody claims it
    assert broker.halted and "not claimed by the replay" in broker.halted


def test_on_a_netting_account_a_foreign_position_on_our_symbol_halts():
    fake = _terminal(NETTING, offset_s=0)
    fake.place_manual("EURUSD", C.ORDER_TYPE_SELL, 0.5)
    broker = _broker(fake)
    report = broker.reconcile(Ledger(symbols=("EURUSD",)))
    assert not report.ok and "the netting account's position is not ours" in report.mismatches[0]


def test_a_working_order_the_broker_does_not_know_is_a_mismatch():
    fake = _terminal(offset_s=0)
    broker = _broker(fake)
    ghost = Order("tf00000000000000d1", "EURUSD", Side.BUY, OrderType.LIMIT, 10_000.0, "entry", T0, price=1.08)
    ghost.state = OrderState.ACCEPTED
    ledger = Ledger.from_snapshot({"portfolio": {"positions": {}}, "orders": [ghost.to_dict()], "symbols": {}})
    report = broker.reconcile(ledger)
    assert not report.ok and "working in the ledger but unknown to the broker" in report.mismatches[0]


def test_choosing_the_mt5_broker_on_linux_is_one_clear_line_and_the_fake_dry_run_works(subprocess_env):
    run = [sys.executable, "-m", "orchestration.cli", "broker", "check"]
    done = subprocess.run(run, env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tradeforge: the MetaTrader 5 broker needs the MetaTrader5 "
                                                                   "package, which exists only for Windows")
    dry = subprocess.run([*run, "--fake", "--symbols", "EURUSD", "XAUUSD"], env=subprocess_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "hedging" in dry.stdout and "XAUUSD: contract 100, lots 0.01-50.0 step 0.01" in dry.stdout


def test_a_refusal_of_the_terminal_is_published_on_broker_error_and_stored_as_a_risk_event():
    """The runner's ledger puts what the broker refused on ``broker.error.{SYM}`` (the data bridge
    stores it in risk_events); the risk model's own decisions stay on ``signals.*``."""
    import json

    from live.ledger import LedgerWriter, Window
    from resources.bus.messages import BadMessage
    from resources.warehouse.ledger import ledger_rows

    fake = _terminal(offset_s=0)
    engine = _engine(_broker(fake, precheck=False))
    ledger = LedgerWriter("errors", "M1")
    fake.fail_next(C.TRADE_RETCODE_NO_MONEY, comment="not enough money")
    window = Window(engine)
    engine.on_bar("EURUSD", _bar(0), {"side": 1})
    messages = ledger.changes(engine, window, "1", T0, "3")
    errors = [m for m in messages if m.subject == "broker.error.EURUSD"]
    assert len(errors) == 1 and errors[0].data["kind"] == "broker" and not errors[0].data["approved"]
    assert C.retcode_label(C.TRADE_RETCODE_NO_MONEY) in errors[0].data["reason"] and "not enough money" in errors[0].data["reason"]
    assert [m.subject for m in messages if m.subject.startswith("signals.")] == ["signals.approved.EURUSD"]
    assert not [m for m in messages if m.subject.startswith("risk.alert.")]
    (row,) = ledger_rows(errors[0].subject, json.dumps(errors[0].data).encode())["risk_events"]
    assert row["kind"] == "broker" and row["symbol"] == "EURUSD" and row["client_id"] == errors[0].data["client_id"] != ""
    with pytest.raises(BadMessage, match="broker error symbol on broker.error.GBPUSD says 'EURUSD'"):
        ledger_rows("broker.error.GBPUSD", json.dumps(errors[0].data).encode())
    assert fake.positions_get() == ()
