"""The fill model and the backtest's broker.

Conventions (DESIGN.md): a decision at a bar's close fills at the next bar's open plus half the
spread (buyers pay the ask, sellers get the bid) plus slippage against the trader; the spread
is the fill bar's own (its closing ask - bid) where the bar has quotes, else the configured
one. Stops and limits trigger inside a bar on the side they execute on (a sell stop on the
bid, a buy stop on the ask). An order the open already went through fills at the open (a gap
through a stop fills worse than the stop, a gap through a limit better). When one bar touches
both a position's stop and its target, the stop wins. A protective stop of an entry filled
inside the bar is checked in that bar too (the worst case); its target from the next bar.
Commission is charged per side: a rate of the notional plus an amount per lot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.market.instruments import Instrument
from models.trading.broker import ACK_ACCEPTED, ACK_REJECTED, ACCEPTED, BrokerEvent, BrokerPort, Fill, OrderStatus, SubmitAck
from models.trading.currency import CM_ONE, ConvMode, fill_conversion
from models.trading.orders import (
    EV_CANCEL,
    EV_CANCEL_REJECT,
    EV_FILL,
    OT_MARKET,
    OT_STOP,
    ST_ACCEPTED,
    ST_CANCELLED,
    ST_EXPIRED,
    ST_FILLED,
    ST_PARTIALLY_FILLED,
    ST_REJECTED,
    Order,
    OrderState,
    OrderType,
)

@dataclass(frozen=True, slots=True)
class FillConfig:
    spread: float | None = None  # price units, where a bar has no bid/ask; None: the instrument's typical spread
    slippage: float = 0.0  # price units against the trader, on market and stop fills
    commission_rate: float = 0.0  # fraction of notional, per side
    commission_per_lot: float = 0.0  # account currency per lot, per side
    use_bar_quotes: bool = True  # the bar's own bid/ask where present


def half_spreads(bid_close: np.ndarray | None, ask_close: np.ndarray | None, n: int, fallback: float,
                 use_bar_quotes: bool = True) -> np.ndarray:
    """Half the spread per bar: the bar's closing ask - bid where both are there and ask > bid,
    else ``fallback`` (the configured spread)."""
    half = np.full(n, fallback / 2.0)
    if use_bar_quotes and bid_close is not None and ask_close is not None:
        spread = ask_close - bid_close
        good = np.isfinite(spread) & (spread > 0)
        half[good] = spread[good] / 2.0
    return half


def market_price(side: int, open_: float, half_spread: float, slippage: float) -> float:
    return open_ + half_spread + slippage if side > 0 else open_ - half_spread - slippage


def trigger_price(side: int, kind: OrderType, level: float, open_: float, high: float, low: float,
                  half_spread: float, slippage: float, at_open: bool) -> tuple[float, str] | None:
    """Where a stop or limit order fills inside this bar, and how; None when not touched.

    ``at_open``: the order was working when the bar opened, so an open beyond its level fills
    it at the open (a gap)."""
    if side > 0:
        ask_open, ask_high, ask_low = open_ + half_spread, high + half_spread, low + half_spread
        if kind is OT_STOP:
            if at_open and ask_open >= level:
                return ask_open + slippage, "gap"
            return (level + slippage, "stop") if ask_high >= level else None
        if at_open and ask_open <= level:
            return ask_open, "gap"
        return (level, "limit") if ask_low <= level else None
    bid_open, bid_high, bid_low = open_ - half_spread, high - half_spread, low - half_spread
    if kind is OT_STOP:
        if at_open and bid_open <= level:
            return bid_open - slippage, "gap"
        return (level - slippage, "stop") if bid_low <= level else None
    if at_open and bid_open >= level:
        return bid_open, "gap"
    return (level, "limit") if bid_high >= level else None


def commission(config: FillConfig, spec: Instrument, qty: float, price: float, conv: float) -> float:
    return config.commission_rate * qty * price * conv + config.commission_per_lot * qty / spec.contract_size


class _Working:
    """The simulated broker's record of one order."""

    __slots__ = ("order", "state", "filled", "avg", "reason", "active", "fills")

    def __init__(self, order: Order, state: OrderState = ST_ACCEPTED) -> None:
        self.order = order
        self.state = state
        self.filled = 0.0
        self.avg = 0.0
        self.reason = ""
        self.active = order.parent_id is None  # children wait for their parent's fill
        self.fills = 0


class SimulatedBroker(BrokerPort):
    """The backtest's broker (and the paper broker's core): fills with :mod:`this fill model
    <models.trading.fills>` as each bar arrives. Net positions per symbol (netting account)."""

    bar_driven = True

    def __init__(self, instruments: dict[str, Instrument], config: FillConfig = FillConfig(),
                 conv_modes: dict[str, ConvMode] | None = None) -> None:
        self.instruments = instruments
        self.config = config
        self.conv_modes = conv_modes or {}
        self._orders: dict[str, _Working] = {}
        self._queue: dict[str, list[_Working]] = {}  # market orders waiting for the next open
        self._resting: dict[str, list[_Working]] = {}  # working stops and limits (active or waiting)
        self._pos: dict[str, float] = {}
        self._events: list[BrokerEvent] = []

    # -- the port --------------------------------------------------------------------------
    def submit(self, order: Order) -> SubmitAck:
        known = self._orders.get(order.client_id)
        if known is not None:  # idempotent: the same id never places a second order
            return SubmitAck(ACK_REJECTED if known.state is ST_REJECTED else ACK_ACCEPTED,
                             f"duplicate client id {order.client_id}: already {known.state.value}")
        reason = self._invalid(order)
        work = _Working(order, ST_REJECTED if reason else ST_ACCEPTED)
        self._orders[order.client_id] = work
        if reason:
            work.reason = reason
            return SubmitAck(ACK_REJECTED, reason)
        if order.parent_id is not None:
            parent = self._orders[order.parent_id]
            if parent.state in (ST_REJECTED, ST_CANCELLED, ST_EXPIRED):
                work.state, work.reason = ST_CANCELLED, f"parent {parent.state.value}"
                return SubmitAck(ACK_REJECTED, work.reason)
            if parent.state is ST_FILLED:
                work.active = True
        target = self._queue if order.type is OT_MARKET else self._resting
        target.setdefault(order.symbol, []).append(work)
        return ACCEPTED

    def _invalid(self, order: Order) -> str:
        if order.symbol not in self.instruments:
            return f"unknown symbol {order.symbol}"
        if not order.qty > 0:
            return f"quantity must be positive, got {order.qty}"
        if order.type is not OT_MARKET and not (order.price and order.price > 0):
            return f"a {order.type.value} order needs a positive price"
        if order.parent_id is not None and order.parent_id not in self._orders:
            return f"unknown parent order {order.parent_id}"
        return ""

    def cancel(self, client_id: str) -> SubmitAck:
        work = self._orders.get(client_id)
        if work is None:
            return SubmitAck(ACK_REJECTED, "unknown order")
        if work.state not in (ST_ACCEPTED, ST_PARTIALLY_FILLED):
            self._events.append(BrokerEvent(EV_CANCEL_REJECT, client_id, -1, f"order is {work.state.value}"))
            return SubmitAck(ACK_REJECTED, f"order is {work.state.value}")
        self._cancel(work, -1, "cancelled on request")
        return ACCEPTED

    def order_status(self, client_id: str) -> OrderStatus | None:
        work = self._orders.get(client_id)
        if work is None:
            return None
        return OrderStatus(client_id, work.state, work.filled, work.avg, work.reason)

    def positions(self) -> dict[str, float]:
        return {s: q for s, q in self._pos.items() if q}

    def advance(self, symbol: str, ts: int, open_: float, high: float, low: float, close: float,
                half_spread: float, conv_known: float) -> list[BrokerEvent]:
        queue, resting = self._queue.get(symbol), self._resting.get(symbol)
        if queue or resting:
            bar = (ts, open_, high, low, half_spread, conv_known)
            if resting:  # working since before this bar: an open beyond the level fills at the open
                self._check_resting(symbol, bar, at_open=True)
            if queue:
                self._queue[symbol] = []
                for work in queue:
                    if work.state is ST_ACCEPTED:
                        self._fill_market(work, bar)
                if self._resting.get(symbol):  # protective orders of what just filled at the open
                    self._check_resting(symbol, bar, at_open=True)
            if self._resting.get(symbol):
                self._check_resting(symbol, bar, at_open=False)
        events, self._events = self._events, []
        return events

    # -- matching --------------------------------------------------------------------------
    def _fill_market(self, work: _Working, bar: tuple) -> None:
        ts, open_, _, _, hs, conv_known = bar
        order = work.order
        qty = self._reducible(work) if order.reduce_only else order.qty - work.filled
        if qty <= 0:
            self._cancel(work, ts, "reduce-only order with no position to reduce")
            return
        slippage = self.config.slippage
        price = open_ + hs + slippage if order.side > 0 else open_ - hs - slippage  # market_price, inlined
        self._fill(work, qty, price, open_, ts, conv_known, "market")

    def _reducible(self, work: _Working) -> float:
        order = work.order
        if not order.reduce_only:
            return order.qty - work.filled
        pos = self._pos.get(order.symbol, 0.0)
        if pos * order.side >= 0:  # flat, or the order would add
            return 0.0
        return min(order.qty - work.filled, abs(pos))

    def _try(self, work: _Working, bar: tuple, at_open: bool) -> bool:
        ts, open_, high, low, hs, conv_known = bar
        order = work.order
        slippage = self.config.slippage if order.type is OT_STOP else 0.0
        hit = trigger_price(order.side, order.type, order.price, open_, high, low, hs, slippage, at_open)
        if hit is None or (at_open and hit[1] != "gap"):  # the open pass takes gaps only
            return False
        qty = self._reducible(work)
        if qty <= 0:
            self._cancel(work, ts, "reduce-only order with no position to reduce")
            return False
        price, how = hit
        self._fill(work, qty, price, open_ if how == "gap" else price, ts, conv_known, how)
        return True

    def _check_resting(self, symbol: str, bar: tuple, at_open: bool) -> None:
        # Protective stops first (the stop wins when stop and target share a bar), then targets,
        # then entry orders; each in submission order.
        filled_inside: list[str] = []
        for work in sorted(self._resting[symbol], key=_priority):
            if work.active and work.state is ST_ACCEPTED and self._try(work, bar, at_open) and not at_open \
                    and work.order.parent_id is None:
                filled_inside.append(work.order.client_id)
        if filled_inside:
            # An entry filled inside the bar: its stop is checked in this bar (the worst case),
            # its target only from the next bar.
            for work in self._resting[symbol]:
                if work.order.parent_id in filled_inside and work.order.type is OT_STOP \
                        and work.active and work.state is ST_ACCEPTED:
                    self._try(work, bar, at_open=False)
        self._resting[symbol] = [w for w in self._resting[symbol] if w.state is ST_ACCEPTED]

    def _fill(self, work: _Working, qty: float, price: float, mid: float, ts: int, conv_known: float, how: str) -> None:
        order = work.order
        symbol, cid = order.symbol, order.client_id
        mode = self.conv_modes.get(symbol, CM_ONE)
        conv = 1.0 if mode is CM_ONE else fill_conversion(mode, price, conv_known)
        work.fills += 1
        config = self.config  # commission(), inlined
        charge = config.commission_rate * qty * price * conv + config.commission_per_lot * qty / self.instruments[symbol].contract_size
        fill = Fill(f"{cid}-{work.fills}", cid, symbol, order.side, qty, price, charge, ts, conv, mid, how)
        filled = work.filled
        work.avg = (work.avg * filled + price * qty) / (filled + qty)
        work.filled = filled = filled + qty
        done = filled >= order.qty - 1e-9 * max(1.0, order.qty)
        if not done and order.reduce_only:
            done = True  # a close order is done once the position is closed
        work.state = ST_FILLED if done else ST_PARTIALLY_FILLED
        self._events.append(BrokerEvent(EV_FILL, cid, ts, how, fill))
        positions = self._pos
        before = positions.get(symbol, 0.0)
        after = before + order.side * qty
        if abs(after) < 1e-9 * max(1.0, abs(before)):
            after = 0.0
        positions[symbol] = after
        resting = self._resting.get(symbol)
        if not resting:
            return  # no stop or limit of this symbol to cancel or to activate
        if before != 0 and (after == 0 or (after > 0) != (before > 0)):
            # The position this order closed takes its protective orders with it.
            for other in resting:
                if other.order.parent_id is not None and other.active and other.state is ST_ACCEPTED \
                        and other.order.parent_id != order.client_id:
                    self._cancel(other, ts, "position closed")
        if order.parent_id is not None:  # one protective order filled: cancel its sibling (OCO)
            for other in self._resting.get(order.symbol, []):
                if other.order.parent_id == order.parent_id and other is not work and other.state is ST_ACCEPTED:
                    self._cancel(other, ts, "sibling filled (OCO)")
        if work.state is ST_FILLED:
            for child in self._resting.get(order.symbol, []):
                if child.order.parent_id == order.client_id:
                    child.active = True

    def _cancel(self, work: _Working, ts: int, reason: str) -> None:
        work.state, work.reason = ST_CANCELLED, reason
        self._events.append(BrokerEvent(EV_CANCEL, work.order.client_id, ts, reason))
        for child in self._resting.get(work.order.symbol, []):
            if child.order.parent_id == work.order.client_id and child.state is ST_ACCEPTED and not child.active:
                child.state, child.reason = ST_CANCELLED, f"parent cancelled: {reason}"
                self._events.append(BrokerEvent(EV_CANCEL, child.order.client_id, ts, child.reason))
        queue = self._queue.get(work.order.symbol)
        if queue and work in queue:
            queue.remove(work)

    # -- state -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "orders": [{"order": w.order.to_dict(), "state": w.state.value, "filled": w.filled, "avg": w.avg,
                        "reason": w.reason, "active": w.active, "fills": w.fills} for w in self._orders.values()],
            "queue": {s: [w.order.client_id for w in ws] for s, ws in self._queue.items()},
            "resting": {s: [w.order.client_id for w in ws] for s, ws in self._resting.items()},
            "positions": dict(self._pos),
        }

    def restore(self, state: dict) -> None:
        self._orders = {}
        for d in state["orders"]:
            work = _Working(Order.from_dict(d["order"]), OrderState(d["state"]))
            work.filled, work.avg, work.reason, work.active, work.fills = d["filled"], d["avg"], d["reason"], d["active"], d["fills"]
            self._orders[work.order.client_id] = work
        self._queue = {s: [self._orders[i] for i in ids] for s, ids in state["queue"].items()}
        self._resting = {s: [self._orders[i] for i in ids] for s, ids in state["resting"].items()}
        self._pos = dict(state["positions"])
        self._events = []


def _priority(work: _Working) -> int:
    order = work.order
    if order.parent_id is not None:
        return 0 if order.type is OT_STOP else 1
    return 2


