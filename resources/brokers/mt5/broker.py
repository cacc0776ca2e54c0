"""MetaTrader 5 behind the trading engine's broker port.

:class:`MT5Broker` drives an ``mt5`` module object: the real ``MetaTrader5`` package on the
Windows machine next to the terminal (:func:`load_mt5_module`), or
:class:`~resources.brokers.mt5.fake.FakeTerminal` in tests and dry runs. How the engine's
orders become MetaTrader's:

- An entry is a market order (``TRADE_ACTION_DEAL``) at the current ask or bid, with its stop
  loss and take profit attached to the position it opens, or a pending limit or stop order
  (``TRADE_ACTION_PENDING``). Its protective children (``sl``/``tp`` orders of the engine)
  are those levels on the position: they are acknowledged without a request, filled when the
  server closes the position at them (deal reason SL/TP), cancelled when the position closes
  otherwise (one-cancels-other, as the backtest's broker does).
- An exit closes our position(s) of the symbol by ticket (``position`` in the request): the
  oldest first on a hedging account, the one position on a netting account.
- Every request carries the strategy's magic number and our client order id in ``comment``
  (18 characters, within MetaTrader's 31), so an order can be found again in the history.
- The volume is the engine's units over the contract size, on the symbol's lot step (entries
  rounded down, never up) within its minimum and maximum; stops are moved out to the symbol's
  stops level, and an entry whose stop or target the market has already passed is refused;
  the filling policy is the first of FOK, IOC, RETURN the symbol allows; ``deviation`` bounds
  the price under instant execution.

Return codes are handled by class (:data:`DONE`, :data:`RETRY`, :data:`UNKNOWN`, everything
else fatal): a requote or a changed price is retried at a fresh price a bounded number of
times; a lost answer (timeout, no connection, no reply) is settled by looking the client id
up in the open orders, the order history and the deal history **before anything else is
sent**: found, it is reported as placed (its fills follow); not found, the order stays
``UNKNOWN`` and is never resent. Fatal codes reject the order with the server's reason.

Fills are read from the deal history on every :meth:`MT5Broker.advance` and reported once
(fill id ``mt5-<deal ticket>``). At start, :meth:`MT5Broker.reconcile` matches the account with
the engine's :class:`~models.trading.ledger.Ledger`; see its doc.
"""

from __future__ import annotations

import os

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from models.market.instruments import Instrument, instrument
from models.trading.broker import AckStatus, BrokerEvent, BrokerPort, BrokerTimeout, Fill, OrderStatus, SubmitAck
from models.trading.currency import conversion_mode, fill_conversion
from models.trading.ledger import Ledger
from models.trading.orders import Order, OrderEvent, OrderState, OrderType, Side
from resources.brokers.mt5 import constants as C

log = logging.getLogger(__name__)

#: MetaTrader's limit on a request's comment; our client ids are 18 characters.
COMMENT_LIMIT = 31
DONE = frozenset({C.TRADE_RETCODE_DONE, C.TRADE_RETCODE_DONE_PARTIAL, C.TRADE_RETCODE_PLACED})
#: Not executed, because the price moved or the server was busy: safe to send again at a fresh price.
RETRY = frozenset({C.TRADE_RETCODE_REQUOTE, C.TRADE_RETCODE_PRICE_CHANGED, C.TRADE_RETCODE_PRICE_OFF,
                   C.TRADE_RETCODE_TOO_MANY_REQUESTS})
#: The request may or may not have been executed: look in the history before anything else.
UNKNOWN = frozenset({C.TRADE_RETCODE_TIMEOUT, C.TRADE_RETCODE_CONNECTION, C.TRADE_RETCODE_ERROR})
_CLIENT_ID = re.compile(r"^tf[0-9a-f]{16}$")
_BY_HAND = {C.DEAL_REASON_CLIENT: "by hand in the terminal", C.DEAL_REASON_MOBILE: "from the mobile app",
            C.DEAL_REASON_WEB: "from the web terminal", C.DEAL_REASON_SO: "by a stop out",
            C.DEAL_REASON_ROLLOVER: "by a rollover", C.DEAL_REASON_VMARGIN: "by variation margin",
            C.DEAL_REASON_SPLIT: "by a split"}


class MT5Error(RuntimeError):
    """The terminal cannot be used as configured; the message is one line saying why."""


class MT5Unavailable(MT5Error):
    """The MetaTrader5 package is not installed (it exists for Windows only)."""


def load_mt5_module() -> Any:
    """``import MetaTrader5``, only when the MT5 broker is chosen; elsewhere one clear line."""
    try:
        import MetaTrader5  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        raise MT5Unavailable(
            "the MetaTrader 5 broker needs the MetaTrader5 package, which exists only for Windows: run the live runner on "
            "the Windows machine next to the terminal (pip install \"tradeforge[mt5]\"); here use the paper broker, or "
            "resources.brokers.mt5.fake.FakeTerminal for a dry run"
        ) from None
    return MetaTrader5


def magic_number(strategy: str) -> int:
    """A strategy's magic number: stable, from its name, in 1 .. 2**31 - 1 (MetaTrader's
    magic is an unsigned long; some tools show only 32 bits)."""
    return int.from_bytes(hashlib.blake2b(strategy.encode(), digest_size=4).digest(), "big") % (2**31 - 1) + 1


@dataclass(frozen=True, slots=True)
class MT5Config:
    magic: int
    symbols: tuple[str, ...] = ()  # selected in Market Watch at connect
    deviation_points: int = 10  # the most the price may move under instant execution
    price_retries: int = 3  # fresh-price retries after a requote or a changed price
    retry_pause_s: float = 0.2  # wait before such a retry
    filling: tuple[str, ...] = ("fok", "ioc", "return")  # preference, among what the symbol allows
    precheck: bool = True  # order_check before order_send: a refusal costs no request
    adjust_stops: bool = True  # move stops inside the stops level out to it (else the server refuses them)
    unknown_grace_s: float = 30.0  # a lost order not found after this long was never placed
    history_days: int = 30  # how far back reconciliation and the client id index look
    server_utc_offset_s: int | None = None  # the trade server's time zone; None: measured at connect

    def __post_init__(self) -> None:
        if not 0 < self.magic < 2**63:
            raise ValueError(f"magic number must be positive, got {self.magic}")
        unknown = set(self.filling) - {"fok", "ioc", "return"}
        if unknown:
            raise ValueError(f"filling modes are fok, ioc and return, got {sorted(unknown)}")


@dataclass
class _Tracked:
    """Our record of one engine order at MetaTrader."""

    client_id: str
    symbol: str
    side: Side
    type: OrderType
    qty: float  # units
    reduce_only: bool = False
    parent_id: str | None = None
    level: float | None = None
    state: OrderState = OrderState.SUBMITTED
    tickets: list[int] = field(default_factory=list)
    filled: float = 0.0
    avg: float = 0.0
    reason: str = ""
    sent_at: float = 0.0
    virtual: bool = False  # a stop loss or take profit living on the position
    claimed: bool = True  # False: found at the broker but not (yet) asked for by the engine
    silent: bool = False  # history the engine has booked: its fills are not reported again
    setup_ms: int = 0  # UTC, when MetaTrader received it (orders found in the history)
    sent: float = 0.0  # units sent, when the lot step rounded the engine's quantity down
    held: list[BrokerEvent] = field(default_factory=list)  # events of an unclaimed order
    given_up: bool = False  # not in the history within unknown_grace_s: told the engine it was never placed

    def status(self) -> OrderStatus:
        return OrderStatus(self.client_id, self.state, self.filled, self.avg, self.reason)


@dataclass
class ReconcileReport:
    """What reconciliation found. ``ok`` is False when a difference is unexplained: the broker
    then refuses orders until a later reconciliation passes."""

    ok: bool
    positions: dict[str, float]  # our units per symbol at the broker
    expected: dict[str, float]  # the ledger's, plus what the explained events bring
    explained: list[str]
    external: list[str]  # positions that are not ours (by hand, other programs): left alone
    unclaimed: list[str]  # client ids of ours the ledger does not know (a replay should claim them)
    mismatches: list[str]

    def summary(self) -> str:
        if not self.ok:
            return f"trading halted: {len(self.mismatches)} unexplained difference(s) with the broker: " + "; ".join(self.mismatches)
        parts = [f"reconciled: {len(self.positions)} position(s) of ours"]
        if self.explained:
            parts.append(f"{len(self.explained)} change(s) while away ({'; '.join(self.explained)})")
        if self.external:
            parts.append(f"{len(self.external)} external position(s) left alone")
        if self.unclaimed:
            parts.append(f"{len(self.unclaimed)} order(s) awaiting the replay: {', '.join(self.unclaimed)}")
        return ", ".join(parts)


class _Refused(Exception):
    """An order we do not send (its reason goes back to the engine as a rejection)."""


class MT5Broker(BrokerPort):
    """The broker port over a MetaTrader 5 terminal (see the module doc)."""

    bar_driven = False  # the market moves on its own: the engine asks on every bar

    def __init__(self, mt5: Any, config: MT5Config, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, account_currency: str | None = None) -> None:
        self.mt5 = mt5
        self.config = config
        self.clock = clock
        self.sleep = sleep
        self.account_currency = account_currency
        self.hedging = False
        self.halted: str | None = None
        self.claims_checked = False  # the replay after a restart had its chance to claim our orders at the broker
        self.offset_s = config.server_utc_offset_s or 0
        self._orders: dict[str, _Tracked] = {}
        self._ticket_cid: dict[int, str] = {}  # MetaTrader order ticket -> client id
        self._position_entry: dict[int, str] = {}  # position identifier -> the entry that opened it
        self._children: dict[str, list[str]] = {}  # entry -> its protective children
        self._deals_seen: set[int] = set()
        self._events: dict[str, list[BrokerEvent]] = {}
        self._conv_known: dict[str, float] = {}
        self._specs: dict[str, Any] = {}
        self._synced_from = 0  # server seconds
        self._connected_at = 0.0
        self._judge_from_ms = 0  # closes by hand before this (UTC ms) were judged by an earlier run

    # -- connection ----------------------------------------------------------------------------
    def connect_from_environment(self, *, fake: bool = False) -> None:
        """:meth:`connect` with ``MT5_LOGIN``, ``MT5_PASSWORD``, ``MT5_SERVER`` and
        ``MT5_TERMINAL_PATH`` (a fake terminal takes none: it is always logged in)."""
        env = os.environ
        if fake:
            self.connect()
            return
        login = env.get("MT5_LOGIN", "").strip()
        if login and not login.isdigit():  # the value may be a secret's neighbour: not echoed
            raise MT5Error("MT5_LOGIN must be the account number (digits only); set it, or unset it to use the terminal's "
                           "logged-in account")
        self.connect(login=int(login) if login else None, password=env.get("MT5_PASSWORD"),
                     server=env.get("MT5_SERVER"), path=env.get("MT5_TERMINAL_PATH"))

    def connect(self, *, login: int | None = None, password: str | None = None, server: str | None = None,
                path: str | None = None, timeout_ms: int = 60_000) -> None:
        """Start (or attach to) the terminal, log in, select the symbols, read the account's
        margin mode and the server's time zone, and index our recent orders by client id."""
        kwargs: dict[str, Any] = {"timeout": timeout_ms}
        if login is not None:
            kwargs.update(login=int(login), password=password or "", server=server or "")
        ok = self.mt5.initialize(path, **kwargs) if path else self.mt5.initialize(**kwargs)
        if not ok:
            raise MT5Error(f"cannot start the MetaTrader 5 terminal{f' at {path}' if path else ''}: {self._error()}")
        account = self.mt5.account_info()
        if account is None:
            raise MT5Error(f"the terminal is not logged in to a trade account: {self._error()}")
        self.hedging = account.margin_mode == C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
        self.account_currency = self.account_currency or account.currency
        for symbol in self.config.symbols:
            if not self.mt5.symbol_select(symbol, True):
                raise MT5Error(f"the broker does not offer {symbol} (symbol_select failed: {self._error()})")
        if self.config.server_utc_offset_s is None:
            self.offset_s = self._measure_offset()
        self._connected_at = self.clock()
        self._judge_from_ms = int((self._connected_at - 3600) * 1000)
        self._synced_from = self._server_now() - 3600  # reconcile() reads further back
        self._index_history()
        log.info("MT5 %s account %s on %s (%s), magic %d, server time UTC%+.1fh", "hedging" if self.hedging else "netting",
                 account.login, account.server, account.currency, self.config.magic, self.offset_s / 3600)

    def shutdown(self) -> None:
        self.mt5.shutdown()

    def _measure_offset(self) -> int:
        """The trade server's clock minus UTC, from the freshest tick, on a half-hour grid."""
        ticks = [self.mt5.symbol_info_tick(s) for s in self.config.symbols]
        times = [t.time for t in ticks if t is not None and t.time]
        if not times:
            log.warning("no tick to measure the server's time zone: assuming UTC (set server_utc_offset_s)")
            return 0
        offset = round((max(times) - self.clock()) / 1800) * 1800
        if abs(offset) > 14 * 3600:
            log.warning("the freshest tick is %.0f h from now (market closed?): assuming UTC", offset / 3600)
            return 0
        return int(offset)

    def _server_now(self) -> int:
        return int(self.clock()) + self.offset_s

    def _error(self) -> str:
        try:
            code, text = self.mt5.last_error()
        except Exception:  # noqa: BLE001  (a broken terminal must not hide the real problem)
            return "no error information"
        return f"{text} ({code})"

    # -- instruments ------------------------------------------------------------------------------
    def trading_spec(self, symbol: str) -> Instrument:
        """Our instrument with the broker's contract size, lot step and lot bounds, so the risk
        model sizes in lots the broker accepts."""
        info = self._symbol(symbol)
        return replace(instrument(symbol), digits=info.digits, contract_size=info.trade_contract_size,
                       lot_step=info.volume_step, min_lot=info.volume_min, max_lot=info.volume_max)

    def _symbol(self, symbol: str) -> Any:
        info = self.mt5.symbol_info(symbol)
        if info is None:
            cached = self._specs.get(symbol)
            if cached is None:
                raise _Refused(f"the broker does not know {symbol}: {self._error()}")
            return cached
        self._specs[symbol] = info
        return info

    def _contract(self, symbol: str) -> float:
        spec = self._specs.get(symbol)
        if spec is None:
            spec = self._symbol(symbol)
        return spec.trade_contract_size

    # -- the port: submit ---------------------------------------------------------------------------
    def submit(self, order: Order) -> SubmitAck:
        known = self._orders.get(order.client_id)
        if known is not None:  # idempotent: the same id never becomes a second order
            return self._claim(known)
        if self.halted:
            return SubmitAck(AckStatus.REJECTED, self.halted)
        if len(order.client_id) > COMMENT_LIMIT:
            return SubmitAck(AckStatus.REJECTED, f"client id {order.client_id!r} is longer than MetaTrader's "
                                                 f"{COMMENT_LIMIT}-character comment")
        tracked = _Tracked(order.client_id, order.symbol, order.side, order.type, order.qty, order.reduce_only,
                           order.parent_id, order.price, sent_at=self.clock())
        try:
            if order.parent_id is not None and order.reduce_only:
                return self._submit_child(order, tracked)
            if order.reduce_only and order.type is OrderType.MARKET:
                return self._submit_close(order, tracked)
            return self._submit_entry(order, tracked)
        except _Refused as refused:
            tracked.state, tracked.reason = OrderState.REJECTED, str(refused)
            self._track(tracked)
            return SubmitAck(AckStatus.REJECTED, str(refused))

    def _submit_entry(self, order: Order, tracked: _Tracked) -> SubmitAck:
        info = self._symbol(order.symbol)
        volume, rounded = self._entry_volume(order, info)
        tick = self._tick(order.symbol)
        buy = order.side is Side.BUY
        if order.type is OrderType.MARKET:
            ref = tick.bid if buy else tick.ask
            action, type_, price = C.TRADE_ACTION_DEAL, (C.ORDER_TYPE_BUY if buy else C.ORDER_TYPE_SELL), 0.0
        else:
            price = self._pending_price(order, info, tick)
            ref = price
            action = C.TRADE_ACTION_PENDING
            type_ = {(True, OrderType.LIMIT): C.ORDER_TYPE_BUY_LIMIT, (False, OrderType.LIMIT): C.ORDER_TYPE_SELL_LIMIT,
                     (True, OrderType.STOP): C.ORDER_TYPE_BUY_STOP, (False, OrderType.STOP): C.ORDER_TYPE_SELL_STOP}[(buy, order.type)]
        sl, tp, notes = self._stops(buy, ref, order.stop_loss, order.take_profit, info)
        request = {"action": action, "symbol": order.symbol, "volume": volume, "type": type_, "price": price, "sl": sl,
                   "tp": tp, "deviation": self.config.deviation_points, "magic": self.config.magic,
                   "comment": order.client_id, "type_time": C.ORDER_TIME_GTC, "type_filling": self._filling(info)}
        if rounded:
            tracked.sent = volume * info.trade_contract_size
        self._track(tracked)
        ack = self._send(request, tracked)
        if ack.status is not AckStatus.REJECTED and rounded:
            notes.append(rounded)
        if notes and ack.status is not AckStatus.REJECTED:
            ack = replace(ack, reason="; ".join(filter(None, [ack.reason, *notes])))
        return ack

    def _submit_close(self, order: Order, tracked: _Tracked) -> SubmitAck:
        """An exit: close our position(s) of the symbol by ticket, up to the order's quantity."""
        info = self._symbol(order.symbol)
        contract = info.trade_contract_size
        closing_type = C.ORDER_TYPE_SELL if order.side is Side.SELL else C.ORDER_TYPE_BUY
        wanted = C.POSITION_TYPE_BUY if order.side is Side.SELL else C.POSITION_TYPE_SELL
        positions = self._positions(order.symbol)
        ours = sorted((p for p in positions if p.magic == self.config.magic and p.type == wanted),
                      key=lambda p: (p.time_msc, p.ticket))
        self._track(tracked)
        left = _lots(order.qty / contract, info.volume_step)
        if not ours or left <= 0:
            tracked.state, tracked.reason = OrderState.CANCELLED, "reduce-only order with no position to reduce"
            self._emit(order.symbol, BrokerEvent(OrderEvent.CANCEL, order.client_id, -1, tracked.reason))
            return SubmitAck(AckStatus.ACCEPTED, tracked.reason)
        acks = []
        for pos in ours:
            if left <= 0:
                break
            volume = min(left, pos.volume)
            left = round(left - volume, 8)
            request = {"action": C.TRADE_ACTION_DEAL, "symbol": order.symbol, "volume": volume, "type": closing_type,
                       "position": pos.ticket, "price": 0.0, "deviation": self.config.deviation_points,
                       "magic": self.config.magic, "comment": order.client_id, "type_time": C.ORDER_TIME_GTC,
                       "type_filling": self._filling(info)}
            acks.append(self._send(request, tracked))
            if acks[-1].status is AckStatus.REJECTED:
                break
        if acks[0].status is AckStatus.REJECTED:
            return acks[0]
        if acks[-1].status is AckStatus.REJECTED:  # a later close failed after an earlier one filled
            self._emit(order.symbol, BrokerEvent(OrderEvent.CANCEL, order.client_id, -1,
                                                 f"part of the close was refused: {acks[-1].reason}"))
            tracked.state, tracked.reason = OrderState.CANCELLED, acks[-1].reason
        return SubmitAck(AckStatus.ACCEPTED, "; ".join(a.reason for a in acks if a.reason))

    def _submit_child(self, order: Order, tracked: _Tracked) -> SubmitAck:
        """A protective stop or target of an entry: it lives on the entry's position."""
        parent = self._orders.get(order.parent_id or "")
        if parent is None:
            raise _Refused(f"unknown parent order {order.parent_id}")
        if parent.state in (OrderState.REJECTED, OrderState.CANCELLED, OrderState.EXPIRED) and not parent.filled:
            raise _Refused(f"parent {parent.state.value}")
        tracked.virtual, tracked.state = True, OrderState.ACCEPTED
        self._track(tracked)
        self._children.setdefault(parent.client_id, []).append(order.client_id)
        position = self._open_position_of(parent)
        if position is None:  # the entry is pending (or its answer was lost): the level travels with it
            return SubmitAck(AckStatus.ACCEPTED)
        want_sl = order.type is OrderType.STOP
        current = position.sl if want_sl else position.tp
        if current:
            return SubmitAck(AckStatus.ACCEPTED, "" if _same(current, order.price) else f"on the position at {current}")
        # The entry went without this level: put it on the position now.
        info = self._symbol(order.symbol)
        buy = position.type == C.POSITION_TYPE_BUY
        tick = self._tick(order.symbol)
        sl, tp, notes = self._stops(buy, tick.bid if buy else tick.ask, order.price if want_sl else (position.sl or None),
                                    None if want_sl else order.price, info)
        request = {"action": C.TRADE_ACTION_SLTP, "symbol": order.symbol, "position": position.ticket,
                   "sl": sl if want_sl else position.sl, "tp": position.tp if want_sl else tp, "magic": self.config.magic}
        result = self.mt5.order_send(request)
        if result is None or result.retcode not in (C.TRADE_RETCODE_DONE, C.TRADE_RETCODE_NO_CHANGES):
            reason = self._reason(result)
            tracked.state, tracked.reason = OrderState.REJECTED, reason
            return SubmitAck(AckStatus.REJECTED, f"could not set the {order.intent} on position {position.ticket}: {reason}")
        return SubmitAck(AckStatus.ACCEPTED, "; ".join(notes))

    # -- sending ---------------------------------------------------------------------------------
    def _send(self, request: dict, tracked: _Tracked) -> SubmitAck:
        """order_send with the return-code classes of the module doc."""
        market = request["action"] == C.TRADE_ACTION_DEAL
        attempts = 0
        while True:
            if market:
                tick = self._tick(request["symbol"])
                request["price"] = tick.ask if request["type"] == C.ORDER_TYPE_BUY else tick.bid
            if self.config.precheck:
                check = self.mt5.order_check(request)
                if check is None:
                    raise _Refused(f"the terminal did not answer order_check ({self._error()}): not sent")
                if check.retcode not in (0, *DONE) and check.retcode not in RETRY:
                    raise _Refused(f"{C.retcode_label(check.retcode)}: {check.comment}")
            tracked.sent_at = self.clock()
            result = self.mt5.order_send(request)
            if result is None or result.retcode in UNKNOWN:
                why = self._error() if result is None else C.retcode_label(result.retcode)
                return self._settle_lost(tracked, why)
            code = result.retcode
            if code in DONE:
                return self._placed(tracked, result)
            if code in RETRY and market and attempts < self.config.price_retries:
                attempts += 1
                log.info("%s: %s, retrying at a fresh price (%d/%d)", tracked.client_id, C.retcode_label(code), attempts,
                         self.config.price_retries)
                if self.config.retry_pause_s:
                    self.sleep(self.config.retry_pause_s)
                continue
            reason = self._reason(result)
            if code in RETRY:
                reason = f"{reason} (after {attempts} fresh-price retries)"
            if not tracked.filled:
                tracked.state, tracked.reason = OrderState.REJECTED, reason
            return SubmitAck(AckStatus.REJECTED, reason)

    def _reason(self, result: Any) -> str:
        if result is None:
            return f"no answer from the terminal ({self._error()})"
        text = result.comment or C.RETCODE_TEXT.get(result.retcode, "")
        return f"{C.retcode_label(result.retcode)}: {text}"

    def _placed(self, tracked: _Tracked, result: Any) -> SubmitAck:
        self._ticket_cid[result.order] = tracked.client_id
        tracked.tickets.append(result.order)
        if tracked.state in (OrderState.SUBMITTED, OrderState.UNKNOWN):
            tracked.state = OrderState.ACCEPTED
        if result.retcode != C.TRADE_RETCODE_PLACED:
            deals = self.mt5.history_deals_get(ticket=result.order)
            for deal in sorted(deals or (), key=lambda d: (d.time_msc, d.ticket)):
                self._on_deal(deal)
            if result.retcode == C.TRADE_RETCODE_DONE_PARTIAL and request_filling(result) != C.ORDER_FILLING_RETURN:
                rest = (result.request.volume - result.volume) * self._contract(tracked.symbol)
                tracked.reason = f"only {result.volume} of {result.request.volume} lots filled; the rest was cancelled"
                if tracked.state is not OrderState.CANCELLED:
                    tracked.state = OrderState.CANCELLED
                    self._emit(tracked.symbol, BrokerEvent(OrderEvent.CANCEL, tracked.client_id, -1, tracked.reason))
                log.info("%s: %s (%.0f units)", tracked.client_id, tracked.reason, rest)
        return SubmitAck(AckStatus.ACCEPTED)

    def _settle_lost(self, tracked: _Tracked, why: str) -> SubmitAck:
        """The answer was lost: look the client id up before anything else is sent."""
        tracked.state = OrderState.UNKNOWN
        found = self._lookup(tracked)
        if found is None:
            raise BrokerTimeout(f"{why}; the terminal cannot tell whether {tracked.client_id} was placed")
        if not found:
            raise BrokerTimeout(f"{why}; {tracked.client_id} is not in the history yet: not resent, asked again later")
        return SubmitAck(AckStatus.ACCEPTED, f"answer lost ({why}); found in the history by client id")

    def _lookup(self, tracked: _Tracked, window_s: int = 86_400) -> bool | None:
        """Search the open orders and the order and deal histories for ``tracked``'s client id;
        register what is found (its fills are queued). None: the terminal did not answer."""
        now = self._server_now()
        lo, hi = now - window_s - 3600, now + 2 * 86_400
        symbol = tracked.symbol
        open_orders = self.mt5.orders_get(symbol=symbol)
        history = self.mt5.history_orders_get(lo, hi, group=symbol)
        deals = self.mt5.history_deals_get(lo, hi, group=symbol)
        if open_orders is None or history is None or deals is None:
            return None
        mine = [o for o in (*open_orders, *history) if o.comment == tracked.client_id and o.magic == self.config.magic]
        for o in mine:
            if o.ticket not in tracked.tickets:
                tracked.tickets.append(o.ticket)
            self._ticket_cid[o.ticket] = tracked.client_id
        tickets = set(tracked.tickets)
        fills = [d for d in deals if d.order in tickets]
        if not mine and not fills:
            return False
        if tracked.state is OrderState.UNKNOWN:
            tracked.state = OrderState.ACCEPTED
        for deal in sorted(fills, key=lambda d: (d.time_msc, d.ticket)):
            self._on_deal(deal)
        for o in mine:
            if o.state in (C.ORDER_STATE_CANCELED, C.ORDER_STATE_EXPIRED, C.ORDER_STATE_REJECTED) and not tracked.filled:
                tracked.state = {C.ORDER_STATE_CANCELED: OrderState.CANCELLED, C.ORDER_STATE_EXPIRED: OrderState.EXPIRED,
                                 C.ORDER_STATE_REJECTED: OrderState.REJECTED}[o.state]
        return True

    # -- the port: the rest ----------------------------------------------------------------------
    def cancel(self, client_id: str) -> SubmitAck:
        tracked = self._orders.get(client_id)
        if tracked is None:
            return SubmitAck(AckStatus.REJECTED, "unknown order")
        if tracked.state in (OrderState.FILLED, OrderState.CANCELLED, OrderState.REJECTED, OrderState.EXPIRED) \
                or tracked.type is OrderType.MARKET:
            reason = ("a market order executes at once: nothing left to cancel" if tracked.type is OrderType.MARKET
                      else f"order is {tracked.state.value}")
            if not (tracked.state is OrderState.FILLED or tracked.filled):  # a fill on its way settles it
                self._emit(tracked.symbol, BrokerEvent(OrderEvent.CANCEL_REJECT, client_id, -1, reason))
            return SubmitAck(AckStatus.REJECTED, reason)
        if tracked.virtual:
            self._cancel_virtual(tracked, "cancelled on request")
            return SubmitAck(AckStatus.ACCEPTED)
        for ticket in tracked.tickets:
            result = self.mt5.order_send({"action": C.TRADE_ACTION_REMOVE, "order": ticket, "magic": self.config.magic,
                                          "comment": client_id})
            if result is None or result.retcode in UNKNOWN:
                raise BrokerTimeout(f"no answer to the removal of {client_id}: {self._reason(result)}")
            if result.retcode not in DONE:
                reason = self._reason(result)
                self._emit(tracked.symbol, BrokerEvent(OrderEvent.CANCEL_REJECT, client_id, -1, reason))
                return SubmitAck(AckStatus.REJECTED, reason)
        tracked.state, tracked.reason = OrderState.CANCELLED, "cancelled on request"
        self._emit(tracked.symbol, BrokerEvent(OrderEvent.CANCEL, client_id, -1, tracked.reason))
        return SubmitAck(AckStatus.ACCEPTED)

    def _cancel_virtual(self, tracked: _Tracked, reason: str) -> None:
        parent = self._orders.get(tracked.parent_id or "")
        position = self._open_position_of(parent) if parent else None
        if position is not None:
            sl = 0.0 if tracked.type is OrderType.STOP else position.sl
            tp = 0.0 if tracked.type is OrderType.LIMIT else position.tp
            self.mt5.order_send({"action": C.TRADE_ACTION_SLTP, "symbol": tracked.symbol, "position": position.ticket,
                                 "sl": sl, "tp": tp, "magic": self.config.magic})
        tracked.state, tracked.reason = OrderState.CANCELLED, reason
        self._emit(tracked.symbol, BrokerEvent(OrderEvent.CANCEL, tracked.client_id, -1, reason))

    def advance(self, symbol: str, ts: int, open_: float, high: float, low: float, close: float,
                half_spread: float, conv_known: float) -> list[BrokerEvent]:
        """What happened at the broker since the last call, for ``symbol`` (the bar's prices are
        not used: the market is the broker's). A terminal that does not answer delays the
        events; it never loses them."""
        self._conv_known[symbol] = conv_known
        try:
            self.sync()
        except BrokerTimeout as exc:
            log.warning("MT5 sync failed, events come later: %s", exc)
        return self._take(symbol)

    def order_status(self, client_id: str) -> OrderStatus | None:
        tracked = self._orders.get(client_id)
        if tracked is not None and tracked.state is not OrderState.UNKNOWN:
            return tracked.status()
        if tracked is None:  # after a restart: search the history for it
            tracked = _Tracked(client_id, "", Side.BUY, OrderType.MARKET, 0.0, sent_at=self._connected_at)
            found = self._lookup_anywhere(tracked)
        else:
            found = self._lookup(tracked)
        if found is None:
            raise BrokerTimeout(f"the terminal does not answer ({self._error()}): {client_id} still unknown")
        if found:
            return tracked.status()
        if self.clock() - (tracked.sent_at or self._connected_at) < self.config.unknown_grace_s:
            raise BrokerTimeout(f"{client_id} is not in the history yet; asked again later")
        tracked.state, tracked.reason, tracked.given_up = OrderState.REJECTED, "never reached the trade server", True
        return None

    def _lookup_anywhere(self, tracked: _Tracked) -> bool | None:
        now = self._server_now()
        lo, hi = now - self.config.history_days * 86_400, now + 2 * 86_400
        history = self.mt5.history_orders_get(lo, hi)
        open_orders = self.mt5.orders_get()
        if history is None or open_orders is None:
            return None
        match = next((o for o in (*open_orders, *history) if o.comment == tracked.client_id and o.magic == self.config.magic), None)
        if match is None:
            return False
        tracked.symbol = match.symbol
        tracked.side = Side.BUY if match.type in (C.ORDER_TYPE_BUY, C.ORDER_TYPE_BUY_LIMIT, C.ORDER_TYPE_BUY_STOP) else Side.SELL
        tracked.qty = match.volume_initial * self._contract(match.symbol)
        self._track(tracked)
        return self._lookup(tracked, window_s=self.config.history_days * 86_400)

    def positions(self) -> dict[str, float]:
        """Our net units per symbol (positions under our magic number)."""
        rows = self.mt5.positions_get()
        if rows is None:
            raise BrokerTimeout(f"the terminal did not answer positions_get: {self._error()}")
        out: dict[str, float] = {}
        for p in rows:
            if p.magic == self.config.magic:
                sign = 1.0 if p.type == C.POSITION_TYPE_BUY else -1.0
                out[p.symbol] = out.get(p.symbol, 0.0) + sign * p.volume * self._contract(p.symbol)
        return {s: u for s, u in out.items() if abs(u) > 1e-9}

    def pending_units(self) -> dict[str, float]:
        """Net units of the fills queued for the engine and not taken yet: a market order sent at
        a bar's close is filled at once at the broker, and the engine books it at its next bar."""
        out: dict[str, float] = {}
        for symbol, events in self._events.items():
            for event in events:
                if event.fill is not None:
                    sign = 1.0 if event.fill.side is Side.BUY else -1.0
                    out[symbol] = out.get(symbol, 0.0) + sign * event.fill.qty
        return {s: u for s, u in out.items() if abs(u) > 1e-9}

    def drain_events(self, symbol: str | None = None) -> list[BrokerEvent]:
        """Events waiting for the engine (all symbols by default): after :meth:`reconcile`, the
        runner applies them (``engine.on_broker_events``) before comparing positions."""
        if symbol is not None:
            return self._take(symbol)
        events = [e for s in list(self._events) for e in self._take(s)]
        return events

    # -- reading the account -----------------------------------------------------------------------
    def sync(self) -> None:
        """Read new deals and the state of our working orders; queue the events."""
        now = self._server_now()
        deals = self.mt5.history_deals_get(self._synced_from, now + 2 * 86_400)
        if deals is None:
            raise BrokerTimeout(f"history_deals_get: {self._error()}")
        newest = self._synced_from
        for deal in sorted(deals, key=lambda d: (d.time_msc, d.ticket)):
            self._on_deal(deal)
            newest = max(newest, deal.time)
        self._synced_from = max(self._synced_from, min(newest, now) - 3600)
        working = [t for t in self._orders.values() if not t.virtual and t.type is not OrderType.MARKET
                   and t.state in (OrderState.ACCEPTED, OrderState.PARTIALLY_FILLED) and t.tickets]
        if working:
            open_orders = self.mt5.orders_get()
            if open_orders is None:
                raise BrokerTimeout(f"orders_get: {self._error()}")
            live = {o.ticket for o in open_orders}
            for t in working:
                for ticket in t.tickets:
                    if ticket in live:
                        continue
                    done = self.mt5.history_orders_get(ticket=ticket)
                    if not done:
                        continue
                    state = done[0].state
                    if state == C.ORDER_STATE_FILLED:
                        for deal in self.mt5.history_deals_get(ticket=ticket) or ():
                            self._on_deal(deal)
                    elif state in (C.ORDER_STATE_CANCELED, C.ORDER_STATE_EXPIRED, C.ORDER_STATE_REJECTED):
                        kind = OrderEvent.EXPIRE if state == C.ORDER_STATE_EXPIRED else OrderEvent.CANCEL
                        t.state = OrderState.EXPIRED if kind is OrderEvent.EXPIRE else OrderState.CANCELLED
                        t.reason = {C.ORDER_STATE_CANCELED: "cancelled at the broker", C.ORDER_STATE_EXPIRED: "expired",
                                    C.ORDER_STATE_REJECTED: "rejected by the trade server on activation"}[state]
                        self._emit(t.symbol, BrokerEvent(kind, t.client_id, -1, t.reason), t)
        self._close_orphaned_children()

    def _on_deal(self, deal: Any) -> None:
        if deal.ticket in self._deals_seen or deal.type not in (C.DEAL_TYPE_BUY, C.DEAL_TYPE_SELL):
            return
        cid = self._ticket_cid.get(deal.order)
        if cid is None and deal.magic == self.config.magic and _CLIENT_ID.match(deal.comment or ""):
            cid = self._unclaimed_from_deal(deal)
        if cid is not None:
            self._deals_seen.add(deal.ticket)
            tracked = self._orders.get(cid)
            if tracked is None:
                return
            if deal.entry == C.DEAL_ENTRY_IN and not tracked.reduce_only:
                self._position_entry[deal.position_id] = cid
            self._fill(tracked, deal, "limit" if tracked.type is OrderType.LIMIT else
                       "stop" if tracked.type is OrderType.STOP else "market")
            if deal.entry in (C.DEAL_ENTRY_OUT, C.DEAL_ENTRY_OUT_BY, C.DEAL_ENTRY_INOUT):
                self._position_closed(deal, "position closed")
            return
        entry_cid = self._position_entry.get(deal.position_id)
        if entry_cid is None or deal.entry not in (C.DEAL_ENTRY_OUT, C.DEAL_ENTRY_OUT_BY, C.DEAL_ENTRY_INOUT):
            return  # not ours (by hand, another program)
        self._deals_seen.add(deal.ticket)
        if deal.reason in (C.DEAL_REASON_SL, C.DEAL_REASON_TP):
            want = OrderType.STOP if deal.reason == C.DEAL_REASON_SL else OrderType.LIMIT
            child = next((self._orders[c] for c in self._children.get(entry_cid, ())
                          if self._orders[c].type is want and self._orders[c].state is OrderState.ACCEPTED), None)
            if child is not None:
                self._fill(child, deal, "stop" if want is OrderType.STOP else "limit")
                self._position_closed(deal, "sibling filled (OCO)")
                return
        if deal.time_msc - self.offset_s * 1000 < self._judge_from_ms:
            return
        how = _BY_HAND.get(deal.reason, f"by deal reason {deal.reason}")
        self.halted = (f"trading halted: our {deal.symbol} position {deal.position_id} was closed {how} (deal {deal.ticket}, "
                       f"{deal.volume} lots at {deal.price}); the engine cannot book that: reconcile before trading again")
        log.error(self.halted)

    def _unclaimed_from_deal(self, deal: Any) -> str:
        """A deal of ours whose order this process did not send (sent before a restart)."""
        cid = deal.comment
        tracked = self._orders.get(cid)
        if tracked is None:
            if self.claims_checked:
                # Past the replay's claims: no decision of this engine will ever claim it (an order
                # given up before the restart and executed since), so its position is nobody's.
                self.halted = (f"trading halted: a deal of ours ({deal.symbol} deal {deal.ticket}, {deal.volume} lots at "
                               f"{deal.price}) belongs to {cid}, which the engine does not trade (given up before the "
                               f"restart and executed since?): reconcile before trading again")
                log.error(self.halted)
            side = Side.BUY if deal.type == C.DEAL_TYPE_BUY else Side.SELL
            tracked = _Tracked(cid, deal.symbol, side, OrderType.MARKET, 0.0, reduce_only=deal.entry != C.DEAL_ENTRY_IN,
                               state=OrderState.ACCEPTED, claimed=False)
            self._track(tracked)
        self._ticket_cid[deal.order] = cid
        if deal.order not in tracked.tickets:
            tracked.tickets.append(deal.order)
            if not tracked.claimed:
                tracked.qty += deal.volume * self._contract(deal.symbol)
        return cid

    def _fill(self, tracked: _Tracked, deal: Any, how: str) -> None:
        contract = self._contract(deal.symbol)
        units = deal.volume * contract
        spec = instrument(deal.symbol)
        mode = conversion_mode(spec, self.account_currency or spec.quote_currency)
        conv = fill_conversion(mode, deal.price, self._conv_known.get(deal.symbol, math.nan))
        half = self._half_spread(deal.symbol)
        mid = deal.price - half if tracked.side is Side.BUY else deal.price + half
        fill = Fill(f"mt5-{deal.ticket}", tracked.client_id, deal.symbol, tracked.side, units, deal.price,
                    -(deal.commission + deal.fee), deal.time_msc - self.offset_s * 1000, conv, mid, how)
        if tracked.given_up and tracked.state is OrderState.REJECTED:
            # This process told the engine the order was never placed (not in the history within
            # unknown_grace_s), and the server executed it after all: its record cannot take the
            # fill, so nothing trades until a reconciliation has looked at the position it left.
            self.halted = (f"trading halted: {tracked.client_id} ({deal.symbol}) was given up as never placed after "
                           f"{self.config.unknown_grace_s:g} s and executed late (deal {deal.ticket}, {deal.volume} lots at "
                           f"{deal.price}): reconcile before trading again")
            log.error(self.halted)
        tracked.avg = (tracked.avg * tracked.filled + deal.price * units) / (tracked.filled + units)
        tracked.filled += units
        rest = ""
        if tracked.state not in (OrderState.CANCELLED, OrderState.EXPIRED):
            done = tracked.filled >= tracked.qty * (1 - 1e-9) or tracked.virtual or tracked.reduce_only
            if not done and tracked.sent and tracked.filled >= tracked.sent * (1 - 1e-9):
                rest = f"the rest ({tracked.qty - tracked.filled:g} units) is below the lot step: not sent"
            tracked.state = OrderState.FILLED if done else OrderState.CANCELLED if rest else OrderState.PARTIALLY_FILLED
        self._emit(deal.symbol, BrokerEvent(OrderEvent.FILL, tracked.client_id, fill.ts, how, fill), tracked)
        if rest:
            tracked.reason = rest
            self._emit(deal.symbol, BrokerEvent(OrderEvent.CANCEL, tracked.client_id, fill.ts, rest), tracked)

    def _half_spread(self, symbol: str) -> float:
        """Half the current spread: the best estimate of a fill's distance from the mid for
        fills the server made on its own (stops, targets, pending orders)."""
        tick = self.mt5.symbol_info_tick(symbol)
        if tick is None or not tick.ask or not tick.bid:
            return 0.0
        return (tick.ask - tick.bid) / 2

    def _position_closed(self, deal: Any, reason: str) -> None:
        """A deal closed (or turned) a position: cancel the protective orders it carried."""
        positions = self.mt5.positions_get(ticket=deal.position_id)
        if positions:  # still open (a partial close)
            return
        entry = self._position_entry.get(deal.position_id)
        for child_id in self._children.get(entry or "", ()):
            child = self._orders[child_id]
            if child.state is OrderState.ACCEPTED:
                child.state, child.reason = OrderState.CANCELLED, reason
                self._emit(child.symbol, BrokerEvent(OrderEvent.CANCEL, child_id, deal.time_msc - self.offset_s * 1000,
                                                     reason), child)

    def _close_orphaned_children(self) -> None:
        for entry, children in self._children.items():
            parent = self._orders.get(entry)
            if parent is None or not parent.filled:
                continue
            if self._open_position_of(parent) is not None:
                continue
            for child_id in children:
                child = self._orders[child_id]
                if child.state is OrderState.ACCEPTED:
                    child.state, child.reason = OrderState.CANCELLED, "position closed"
                    self._emit(child.symbol, BrokerEvent(OrderEvent.CANCEL, child_id, -1, child.reason), child)

    def _open_position_of(self, parent: _Tracked) -> Any:
        for ticket in parent.tickets:
            rows = self.mt5.positions_get(ticket=ticket)
            if rows:
                return rows[0]
        for position_id, cid in self._position_entry.items():
            if cid == parent.client_id:
                rows = self.mt5.positions_get(ticket=position_id)
                if rows:
                    return rows[0]
        return None

    # -- reconciliation ---------------------------------------------------------------------------
    def reconcile(self, ledger: Ledger) -> ReconcileReport:
        """Match the account with the engine's ledger at start.

        Our orders and deals (magic number, client id in the comment) are indexed; the
        ledger's unfinished orders are registered again (protective stops and targets on
        their entries' positions); what happened while the runner was away is explained and
        queued as events (a stop or target hit, an order filled after its answer was lost);
        orders of ours the ledger does not know are held for the replay to claim (same
        client id, so nothing is sent twice). Positions of other magic numbers are external
        and left alone, except on a netting account, where one would share our symbol's
        single position. Any difference left unexplained halts trading with its reason."""
        now = self._server_now()
        lo, hi = now - self.config.history_days * 86_400, now + 2 * 86_400
        positions = self.mt5.positions_get()
        open_orders = self.mt5.orders_get()
        history = self.mt5.history_orders_get(lo, hi)
        deals = self.mt5.history_deals_get(lo, hi)
        if positions is None or open_orders is None or history is None or deals is None:
            raise MT5Error(f"cannot reconcile: the terminal does not answer ({self._error()})")
        magic = self.config.magic
        known = set(ledger.known) | {o.client_id for o in ledger.orders}
        working = {o.client_id: o for o in ledger.orders}
        explained, mismatches, external, unclaimed = [], [], [], []
        # 1. Every order of ours at the broker by client id. The ledger's unfinished orders are
        #    tracked as the engine has them; its finished ones and older history are known (their
        #    fills are not reported again); the rest was sent after the ledger was saved.
        self._index_orders((*history, *open_orders))
        for lo_ in ledger.orders:
            found = self._orders.get(lo_.client_id)
            tracked = _Tracked(lo_.client_id, lo_.symbol, lo_.side, lo_.type, lo_.qty, lo_.reduce_only, lo_.parent_id,
                               lo_.price, state=OrderState.ACCEPTED, sent_at=self._connected_at)
            tracked.tickets = list(found.tickets) if found else []
            if lo_.parent_id is not None and lo_.reduce_only:
                tracked.virtual = True
                self._children.setdefault(lo_.parent_id, [])
                if lo_.client_id not in self._children[lo_.parent_id]:
                    self._children[lo_.parent_id].append(lo_.client_id)
            elif not tracked.tickets and lo_.state is OrderState.ACCEPTED:
                mismatches.append(f"order {lo_.client_id} ({lo_.symbol} {lo_.type.value}) is working in the ledger but "
                                  f"unknown to the broker")
            self._track(tracked)
        for cid, t in self._orders.items():
            if cid in working:
                continue
            if cid in known or t.setup_ms < ledger.as_of_ms:
                t.claimed, t.silent, t.held = True, True, []
            elif not t.claimed:
                unclaimed.append(cid)
        # 2. Deals since the window's start, in time order: fills of the ledger's orders (a repeat
        #    of one the engine booked is ignored by it), stops and targets hit, unclaimed fills.
        self._synced_from = lo
        self._judge_from_ms = ledger.as_of_ms
        self._deals_seen.clear()
        self.sync()
        pending: dict[str, float] = {}
        for cid, t in self._orders.items():
            lo_ = working.get(cid)
            if cid in unclaimed:
                pending[t.symbol] = pending.get(t.symbol, 0.0) + int(t.side) * t.filled
            elif lo_ is not None:
                new = t.filled - lo_.filled_qty
                if new > 1e-9:
                    pending[t.symbol] = pending.get(t.symbol, 0.0) + int(t.side) * new
                    explained.append(f"{cid} ({lo_.intent}) filled {new:g} units while away")
        # 3. Positions: ours against the ledger and what explains the difference.
        ours: dict[str, float] = {}
        for p in positions:
            units = (1.0 if p.type == C.POSITION_TYPE_BUY else -1.0) * p.volume * self._contract(p.symbol)
            if p.magic == magic:
                ours[p.symbol] = ours.get(p.symbol, 0.0) + units
            else:
                who = "by hand" if p.magic == 0 else f"magic {p.magic}"
                external.append(f"{p.symbol} {'buy' if units > 0 else 'sell'} {p.volume} lots (ticket {p.ticket}, {who})")
                if not self.hedging and p.symbol in (set(ledger.symbols) | set(self.config.symbols) | set(ledger.positions)):
                    mismatches.append(f"{p.symbol}: the netting account's position is not ours ({who}); our orders would "
                                      f"net against it")
        expected = {s: ledger.positions.get(s, 0.0) + pending.get(s, 0.0) for s in set(ledger.positions) | set(pending)}
        for symbol in sorted(set(ours) | set(expected)):
            have, want = ours.get(symbol, 0.0), expected.get(symbol, 0.0)
            if abs(have - want) > 1e-6 * max(1.0, abs(want)):
                mismatches.append(f"{symbol}: the broker holds {have:+,.0f} units of ours, the ledger and the history "
                                  f"explain {want:+,.0f}")
        # 4. Our pending orders at the broker must be the ledger's or awaiting the replay.
        for o in open_orders:
            if o.magic == magic and o.comment not in known and o.comment not in unclaimed:
                mismatches.append(f"pending order {o.ticket} ({o.symbol}) of ours is unknown to the ledger")
        if self.halted:
            mismatches.append(self.halted)
        report = ReconcileReport(not mismatches, {s: u for s, u in ours.items() if abs(u) > 1e-9},
                                 {s: u for s, u in expected.items() if abs(u) > 1e-9}, explained, external, unclaimed,
                                 mismatches)
        self.halted = None if report.ok else report.summary()
        log.log(logging.INFO if report.ok else logging.ERROR, report.summary())
        return report

    def unclaimed(self) -> list[str]:
        """Orders of ours found at the broker that no submit has claimed: after the runner's
        replay this must be empty, else :meth:`check_claimed` halts trading."""
        return sorted(cid for cid, t in self._orders.items() if not t.claimed)

    def check_claimed(self) -> None:
        left = self.unclaimed()
        self.claims_checked = True
        if left:
            self.halted = (f"trading halted: {len(left)} order(s) of ours at the broker were not claimed by the replay: "
                           f"{', '.join(left)}")
            log.error(self.halted)

    # -- helpers ------------------------------------------------------------------------------------
    def _claim(self, tracked: _Tracked) -> SubmitAck:
        if not tracked.claimed:
            tracked.claimed = True
            for event in tracked.held:
                self._emit(tracked.symbol, event)
            tracked.held.clear()
            return SubmitAck(AckStatus.ACCEPTED, f"{tracked.client_id} was already placed (found at the broker): not sent again")
        if tracked.state is OrderState.REJECTED:
            return SubmitAck(AckStatus.REJECTED, f"duplicate client id {tracked.client_id}: already rejected ({tracked.reason})")
        return SubmitAck(AckStatus.ACCEPTED, f"duplicate client id {tracked.client_id}: already {tracked.state.value}")

    def _track(self, tracked: _Tracked) -> None:
        self._orders[tracked.client_id] = tracked

    def _emit(self, symbol: str, event: BrokerEvent, tracked: _Tracked | None = None) -> None:
        if tracked is not None and tracked.silent:
            return
        if tracked is not None and not tracked.claimed:
            tracked.held.append(event)
        else:
            self._events.setdefault(symbol, []).append(event)

    def _take(self, symbol: str) -> list[BrokerEvent]:
        return self._events.pop(symbol, [])

    def _tick(self, symbol: str) -> Any:
        tick = self.mt5.symbol_info_tick(symbol)
        if tick is None or not tick.bid or not tick.ask:
            raise _Refused(f"no price for {symbol} ({self._error()}): not sent")
        return tick

    def _positions(self, symbol: str) -> tuple:
        rows = self.mt5.positions_get(symbol=symbol)
        if rows is None:
            raise _Refused(f"the terminal did not answer positions_get ({self._error()}): not sent")
        return rows

    def _filling(self, info: Any) -> int:
        flags = info.filling_mode
        for mode in self.config.filling:
            if mode == "fok" and flags & C.SYMBOL_FILLING_FOK:
                return C.ORDER_FILLING_FOK
            if mode == "ioc" and flags & C.SYMBOL_FILLING_IOC:
                return C.ORDER_FILLING_IOC
            if mode == "return":
                return C.ORDER_FILLING_RETURN
        return C.ORDER_FILLING_RETURN

    def _entry_volume(self, order: Order, info: Any) -> tuple[float, str]:
        lots = order.qty / info.trade_contract_size
        volume = _lots(lots, info.volume_step)
        if volume < info.volume_min - 1e-9:
            raise _Refused(f"{lots:.6g} lots ({order.qty:g} units) is below {order.symbol}'s minimum of {info.volume_min} lots")
        if volume > info.volume_max + 1e-9:
            raise _Refused(f"{lots:.6g} lots is above {order.symbol}'s maximum of {info.volume_max} lots")
        note = ""
        if abs(volume - lots) > 1e-9 * max(1.0, lots):
            note = f"volume rounded down to the lot step {info.volume_step}: {volume} lots of {lots:.6g}"
        return volume, note

    def _pending_price(self, order: Order, info: Any, tick: Any) -> float:
        price = round(float(order.price or 0.0), info.digits)
        level = info.trade_stops_level * info.point
        buy = order.side is Side.BUY
        if not price > 0:
            raise _Refused(f"a {order.type.value} order needs a positive price")
        too_close = {(True, OrderType.LIMIT): price > tick.ask - level, (False, OrderType.LIMIT): price < tick.bid + level,
                     (True, OrderType.STOP): price < tick.ask + level, (False, OrderType.STOP): price > tick.bid - level}
        if too_close[(buy, order.type)]:
            raise _Refused(f"{'buy' if buy else 'sell'} {order.type.value} at {price} is on the wrong side of the market "
                           f"(bid {tick.bid}, ask {tick.ask}) or within the stops level ({info.trade_stops_level} points)")
        return price

    def _stops(self, buy: bool, ref: float, sl: float | None, tp: float | None, info: Any) -> tuple[float, float, list[str]]:
        """Stop loss and take profit on the symbol's price grid, outside its stops level from
        ``ref`` (the bid for a buy, the ask for a sell, or a pending order's price)."""
        point, digits = info.point, info.digits
        level = info.trade_stops_level * point
        notes: list[str] = []
        out_sl = out_tp = 0.0
        if sl:
            sl = round(sl, digits)
            if (buy and sl >= ref) or (not buy and sl <= ref):
                raise _Refused(f"the market ({'bid' if buy else 'ask'} {ref}) is already through the stop loss {sl}")
            limit = ref - level if buy else ref + level
            if (buy and sl > limit) or (not buy and sl < limit):
                if not self.config.adjust_stops:
                    out_sl = sl
                else:
                    moved = _to_grid(limit, point, digits, down=buy)
                    notes.append(f"stop loss moved from {sl} to {moved}: the stops level is {info.trade_stops_level} points")
                    out_sl = moved
            else:
                out_sl = sl
        if tp:
            tp = round(tp, digits)
            if (buy and tp <= ref) or (not buy and tp >= ref):
                raise _Refused(f"the market ({'bid' if buy else 'ask'} {ref}) is already past the take profit {tp}")
            limit = ref + level if buy else ref - level
            if (buy and tp < limit) or (not buy and tp > limit):
                if not self.config.adjust_stops:
                    out_tp = tp
                else:
                    moved = _to_grid(limit, point, digits, down=not buy)
                    notes.append(f"take profit moved from {tp} to {moved}: the stops level is {info.trade_stops_level} points")
                    out_tp = moved
            else:
                out_tp = tp
        return out_sl, out_tp, notes

    def _index_history(self) -> None:
        """Our orders of the last ``history_days`` by client id, so a replayed decision is
        recognised (and claimed) instead of sent again."""
        now = self._server_now()
        lo, hi = now - self.config.history_days * 86_400, now + 2 * 86_400
        history = self.mt5.history_orders_get(lo, hi)
        open_orders = self.mt5.orders_get()
        if history is None or open_orders is None:
            raise MT5Error(f"cannot read the order history: {self._error()}")
        self._index_orders((*history, *open_orders))

    def _index_orders(self, orders: Iterable[Any]) -> None:
        """Track every order of ours found at the broker under its client id (unclaimed until
        the engine or the ledger says it knows it)."""
        for o in sorted(orders, key=lambda o: o.ticket):
            if o.magic != self.config.magic or not _CLIENT_ID.match(o.comment or ""):
                continue
            self._ticket_cid[o.ticket] = o.comment
            tracked = self._orders.get(o.comment)
            if tracked is None:
                buy = o.type in (C.ORDER_TYPE_BUY, C.ORDER_TYPE_BUY_LIMIT, C.ORDER_TYPE_BUY_STOP)
                kind = OrderType.LIMIT if o.type in (C.ORDER_TYPE_BUY_LIMIT, C.ORDER_TYPE_SELL_LIMIT) else \
                    OrderType.STOP if o.type in (C.ORDER_TYPE_BUY_STOP, C.ORDER_TYPE_SELL_STOP) else OrderType.MARKET
                tracked = _Tracked(o.comment, o.symbol, Side.BUY if buy else Side.SELL, kind, 0.0,
                                   reduce_only=bool(o.position_id) and o.position_id != o.ticket, level=o.price_open or None,
                                   state=OrderState.ACCEPTED, claimed=False, setup_ms=o.time_setup_msc - self.offset_s * 1000)
                self._track(tracked)
            if o.ticket not in tracked.tickets:
                tracked.tickets.append(o.ticket)
                tracked.qty += o.volume_initial * self._contract(o.symbol)
                tracked.setup_ms = min(tracked.setup_ms or 2**62, o.time_setup_msc - self.offset_s * 1000)
            if o.state in (C.ORDER_STATE_CANCELED, C.ORDER_STATE_EXPIRED, C.ORDER_STATE_REJECTED) and not tracked.filled:
                tracked.state = {C.ORDER_STATE_CANCELED: OrderState.CANCELLED, C.ORDER_STATE_EXPIRED: OrderState.EXPIRED,
                                 C.ORDER_STATE_REJECTED: OrderState.REJECTED}[o.state]

    def known_ids(self) -> Iterable[str]:
        return self._orders.keys()


def request_filling(result: Any) -> int:
    request = getattr(result, "request", None)
    return getattr(request, "type_filling", C.ORDER_FILLING_FOK)


def _lots(lots: float, step: float) -> float:
    """``lots`` on the lot step: the nearest step when within rounding noise, else rounded down."""
    steps = lots / step
    nearest = round(steps)
    n = nearest if abs(steps - nearest) < 1e-6 else math.floor(steps)
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return round(n * step, decimals + 2)


def _to_grid(price: float, point: float, digits: int, down: bool) -> float:
    ticks = price / point
    n = math.floor(ticks + 1e-6) if down else math.ceil(ticks - 1e-6)
    return round(n * point, digits)


def _same(a: float, b: float | None) -> bool:
    return b is not None and abs(a - b) < 1e-9 * max(1.0, abs(a))
