"""A faithful fake of a MetaTrader 5 terminal and its trade server, for tests and dry runs.

``FakeTerminal()`` has the functions, constants and result types of ``import MetaTrader5 as
mt5`` (:mod:`constants`, :mod:`records`), so the broker runs on it unchanged. Behind them a
small trade server behaves as MT5 does:

- **Accounts**: netting (one position per symbol; deals in, out and in/out; a reversal keeps the
  position's identifier) or hedging (a position per order; closed by ticket through the
  request's ``position``). Balance, floating profit, margin (notional / the symbol's leverage),
  free margin and margin level; commission per lot and side on each deal.
- **Orders**: market orders at the ask (buy) or bid (sell), with the price checked against
  ``deviation`` under instant execution; pending limit and stop orders, triggered on the side
  they execute on; stop loss and take profit on positions; ``order_check``; SL/TP changes
  (``TRADE_ACTION_SLTP``); removal of pending orders. Checks of volume (minimum, maximum,
  step), stops (the symbol's stops level, the right side of the price), filling policy (the
  symbol's flags), trade mode, margin.
- **Prices**: :meth:`FakeTerminal.set_quote` moves a symbol; with ``continuous=True`` the market
  is taken to pass through every price between the two quotes (orders fill at their level, in
  the order the path reaches them), otherwise it jumped (orders fill at the new quote, a gap).
  :meth:`FakeTerminal.run_bar` walks a bar: open (a jump), then low and high (the nearer first
  for a falling bar), then the close.
- **Times** are the trade server's: UTC plus ``server_utc_offset_s``, as MT5 reports them.

Scenario controls (each affects the next trade request(s)): :meth:`requote`,
:meth:`lose_answer` (before or after execution, as ``None`` or a timeout/connection code),
:meth:`execute_late` (the request reaches the server after the answer was lost),
:meth:`fail_next` (any return code), :meth:`disconnect` / :meth:`reconnect` (the trade server),
:meth:`kill_ipc` / :meth:`restore_ipc` (the terminal itself), :meth:`close_market`,
:meth:`set_trade_mode`, :meth:`set_liquidity` (partial fills), :meth:`set_balance` (margin),
:meth:`place_manual` (a position opened by hand in the terminal).

What it leaves out: swaps, stop-outs, hedged-margin discounts, stop-limit orders, close-by,
exchange order books. Unsupported requests answer ``TRADE_RETCODE_INVALID_ORDER``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from models.market.instruments import instrument
from models.trading.currency import ConvMode, conversion_mode, cross_pair
from resources.brokers.mt5 import constants as C
from resources.brokers.mt5.records import (
    AccountInfo,
    OrderCheckResult,
    OrderSendResult,
    SymbolInfo,
    TerminalInfo,
    Tick,
    TradeDeal,
    TradeOrder,
    TradePosition,
    TradeRequest,
)

_BUY_TYPES = (C.ORDER_TYPE_BUY, C.ORDER_TYPE_BUY_LIMIT, C.ORDER_TYPE_BUY_STOP)
_PENDING_TYPES = (C.ORDER_TYPE_BUY_LIMIT, C.ORDER_TYPE_SELL_LIMIT, C.ORDER_TYPE_BUY_STOP, C.ORDER_TYPE_SELL_STOP)
_EPS = 1e-9


@dataclass
class FakeSymbol:
    """A symbol's trading specification on the fake server (MetaTrader's names)."""

    name: str
    digits: int
    contract_size: float
    volume_min: float
    volume_max: float
    volume_step: float
    leverage: float
    currency_base: str
    currency_profit: str
    stops_level: int = 0  # points
    freeze_level: int = 0
    filling_mode: int = C.SYMBOL_FILLING_FOK | C.SYMBOL_FILLING_IOC
    exemode: int = C.SYMBOL_TRADE_EXECUTION_MARKET
    trade_mode: int = C.SYMBOL_TRADE_MODE_FULL
    selected: bool = False

    @property
    def point(self) -> float:
        return 10.0 ** -self.digits


@dataclass
class _Order:
    ticket: int
    symbol: str
    type: int
    volume_initial: float
    volume_current: float
    price_open: float
    sl: float
    tp: float
    magic: int
    comment: str
    reason: int
    type_filling: int
    type_time: int
    time_expiration: int  # server seconds
    setup_ms: int  # UTC
    state: int
    done_ms: int = 0
    position_id: int = 0
    position: int = 0  # the position a closing order names

    def record(self, offset_ms: int, price_current: float) -> TradeOrder:
        setup, done = self.setup_ms + offset_ms, (self.done_ms + offset_ms if self.done_ms else 0)
        return TradeOrder(self.ticket, setup // 1000, setup, done // 1000, done, self.time_expiration, self.type,
                          self.type_time, self.type_filling, self.state, self.magic, self.position_id, 0, self.reason,
                          self.volume_initial, self.volume_current, self.price_open, self.sl, self.tp, price_current, 0.0,
                          self.symbol, self.comment, "")


@dataclass
class _Position:
    ticket: int
    identifier: int
    symbol: str
    type: int  # POSITION_TYPE_BUY / SELL
    volume: float
    price_open: float
    sl: float
    tp: float
    magic: int
    comment: str
    reason: int
    time_ms: int
    update_ms: int


@dataclass
class _Fault:
    kind: str  # retcode, requote, lost, late
    retcode: int = 0
    comment: str = ""
    after_execution: bool = False
    answer: str = "none"  # none (order_send returns None), timeout, connection
    move_points: int = 0


@dataclass
class _Quote:
    bid: float
    ask: float
    time_ms: int  # UTC


class FakeTerminal:
    """See the module doc. Every public function of the MetaTrader5 package the broker uses is
    a method with the package's signature; constants are attributes."""

    def __init__(self, *, login: int = 5_000_001, password: str = "demo", server: str = "FakeBroker-Demo",
                 balance: float = 100_000.0, currency: str = "USD", leverage: int = 30,
                 margin_mode: int = C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING, commission_per_lot: float = 0.0,
                 server_utc_offset_s: int = 0, start_ms: int = 1_700_000_000_000, company: str = "Fake Broker Ltd") -> None:
        self.account_login, self.account_password, self.account_server = login, password, server
        self.company = company
        self.balance = balance
        self.currency = currency
        self.leverage = leverage
        self.margin_mode = margin_mode
        self.commission_per_lot = commission_per_lot
        self.offset_ms = server_utc_offset_s * 1000
        self.now_ms = start_ms  # UTC
        self.symbols: dict[str, FakeSymbol] = {}
        self.quotes: dict[str, _Quote] = {}
        self.open_orders: dict[int, _Order] = {}
        self.history_orders: dict[int, _Order] = {}
        self.deals: list[TradeDeal] = []
        self.positions: dict[int, _Position] = {}
        self.initialized = False
        self.logged_in = False
        self.ipc_alive = True
        self.server_connected = True
        self.trade_allowed = True  # the terminal's "Algo Trading" button
        self.closed_markets: set[str] = set()
        self.liquidity: dict[str, float] = {}  # lots available per execution
        self.calls: list[tuple[str, Any]] = []  # every trade request received, for tests to count
        self._faults: list[_Fault] = []
        self._late: list[dict] = []
        self._ticket = 100_000
        self._deal_ticket = 500_000
        self._request_id = 0
        self._error: tuple[int, str] = (C.RES_S_OK, C.LAST_ERROR_TEXT[C.RES_S_OK])

    def __getattr__(self, name: str) -> Any:
        # The package's constants: mt5.ORDER_TYPE_BUY, mt5.TRADE_RETCODE_DONE, ...
        if name.isupper() and hasattr(C, name):
            return getattr(C, name)
        raise AttributeError(name)

    # -- set-up -----------------------------------------------------------------------------
    @classmethod
    def quoting(cls, symbols: tuple[str, ...] | list[str], mids: dict[str, float] | None = None) -> FakeTerminal:
        """A started terminal with ``symbols`` quoted two points wide around ``mids`` (1.0 by default):
        the dry runs of ``tradeforge broker check|publish --fake``."""
        terminal = cls()
        for symbol in symbols:
            terminal.add_symbol(symbol)
        terminal.initialize()
        for symbol in symbols:
            mid = (mids or {}).get(symbol, 1.0)
            terminal.set_quote(symbol, mid, mid + 2 * terminal.symbols[symbol].point)
        return terminal

    def add_symbol(self, name: str, **overrides: Any) -> FakeSymbol:
        """Add a symbol with the trading specification of :func:`models.market.instruments.instrument`
        (contract size, lot step and bounds, leverage, digits), overridable field by field."""
        spec = instrument(name)
        base, quote = spec.currencies
        symbol = FakeSymbol(name, spec.digits, spec.contract_size, spec.min_lot, spec.max_lot, spec.lot_step,
                            spec.leverage, base, quote)
        symbol = replace(symbol, **overrides)
        self.symbols[name] = symbol
        return symbol

    def set_quote(self, symbol: str, bid: float, ask: float, time_ms: int | None = None, *, continuous: bool = False) -> None:
        """A new quote (``time_ms`` in UTC; default: the current time). ``continuous``: the
        market passed through every price in between (orders fill at their levels in the order
        the path reaches them); otherwise it jumped (orders fill at the new prices)."""
        if time_ms is not None:
            self.now_ms = max(self.now_ms, int(time_ms))
        old = self.quotes.get(symbol)
        self.quotes[symbol] = _Quote(bid, ask, self.now_ms)
        self._run_late()
        self._expire_orders()
        self._retry_return_orders(symbol)
        if old is None:
            return
        self._trigger(symbol, old, self.quotes[symbol], continuous)

    def run_bar(self, symbol: str, ts_ms: int, open_: float, high: float, low: float, close: float,
                half_spread: float, duration_ms: int = 60_000) -> None:
        """Walk one bar of mid prices: the open (a jump from the last quote), then the low and
        the high (the high first for a falling bar), then the close, at a quarter of the bar
        apart."""
        path = (high, low) if close < open_ else (low, high)
        steps = [(open_, False), (path[0], True), (path[1], True), (close, True)]
        for k, (mid, continuous) in enumerate(steps):
            self.set_quote(symbol, mid - half_spread, mid + half_spread, ts_ms + k * duration_ms // 4, continuous=continuous)

    def advance_time(self, ms: int) -> None:
        self.now_ms += int(ms)
        self._expire_orders()

    def utc_now(self) -> float:
        """The fake's clock in UTC seconds: give it to the broker as its clock."""
        return self.now_ms / 1000.0

    # -- scenario controls ------------------------------------------------------------------
    def requote(self, times: int = 1, retcode: int = C.TRADE_RETCODE_REQUOTE, move_points: int = 3) -> None:
        """The next ``times`` market requests are answered with ``retcode`` (requote, price
        changed or price off) and the market moves ``move_points`` against the trader."""
        self._faults += [_Fault("requote", retcode=retcode, move_points=move_points) for _ in range(times)]

    def lose_answer(self, after_execution: bool = True, answer: str = "none", times: int = 1) -> None:
        """The answer to the next request is lost: ``order_send`` returns None (IPC timeout) or,
        with ``answer="timeout"``/``"connection"``, a result with that return code and no
        tickets. ``after_execution``: the server executed it (the order and its deal are in the
        history); otherwise the request never reached the server."""
        self._faults += [_Fault("lost", after_execution=after_execution, answer=answer) for _ in range(times)]

    def execute_late(self) -> None:
        """The next request reaches the server only at the next quote: the answer is lost now
        (None), the order appears in the history later."""
        self._faults.append(_Fault("late"))

    def fail_next(self, retcode: int, comment: str = "", times: int = 1) -> None:
        """The next ``times`` requests are answered with ``retcode`` and not executed."""
        self._faults += [_Fault("retcode", retcode=retcode, comment=comment) for _ in range(times)]

    def disconnect(self) -> None:
        """The terminal loses the trade server: requests answer TRADE_RETCODE_CONNECTION."""
        self.server_connected = False

    def reconnect(self) -> None:
        self.server_connected = True

    def kill_ipc(self) -> None:
        """The terminal stops answering: every function returns None (last_error: no IPC)."""
        self.ipc_alive = False

    def restore_ipc(self) -> None:
        self.ipc_alive = True

    def close_market(self, symbol: str) -> None:
        self.closed_markets.add(symbol)

    def open_market(self, symbol: str) -> None:
        self.closed_markets.discard(symbol)

    def set_trade_mode(self, symbol: str, mode: int) -> None:
        self.symbols[symbol].trade_mode = mode

    def set_liquidity(self, symbol: str, lots: float | None) -> None:
        """At most ``lots`` per execution (None: unlimited): FOK requests larger than that are
        rejected, IOC ones fill partly (the rest is cancelled), RETURN ones fill partly and keep
        the rest working until liquidity returns."""
        if lots is None:
            self.liquidity.pop(symbol, None)
        else:
            self.liquidity[symbol] = lots

    def set_balance(self, balance: float) -> None:
        self.balance = balance

    def place_manual(self, symbol: str, type_: int, volume: float, sl: float = 0.0, tp: float = 0.0) -> OrderSendResult:
        """A trade made by hand in the terminal (magic 0, reason client)."""
        quote = self.quotes[symbol]
        request = {"action": C.TRADE_ACTION_DEAL, "symbol": symbol, "volume": volume, "type": type_,
                   "price": quote.ask if type_ == C.ORDER_TYPE_BUY else quote.bid, "sl": sl, "tp": tp,
                   "type_filling": C.ORDER_FILLING_FOK, "comment": "manual"}
        return self._execute(self._request(request), reason=C.ORDER_REASON_CLIENT)

    def close_manual(self, ticket: int, volume: float | None = None) -> OrderSendResult:
        """Close (part of) a position by hand in the terminal."""
        pos = self.positions[ticket]
        quote = self.quotes[pos.symbol]
        buy = pos.type == C.POSITION_TYPE_SELL
        request = {"action": C.TRADE_ACTION_DEAL, "symbol": pos.symbol, "volume": volume or pos.volume, "position": ticket,
                   "type": C.ORDER_TYPE_BUY if buy else C.ORDER_TYPE_SELL, "price": quote.ask if buy else quote.bid,
                   "type_filling": C.ORDER_FILLING_FOK, "comment": "closed by hand"}
        return self._execute(self._request(request), reason=C.ORDER_REASON_CLIENT)

    # -- the package's functions: connection --------------------------------------------------
    def initialize(self, path: str | None = None, *, login: int | None = None, password: str | None = None,
                   server: str | None = None, timeout: int | None = None, portable: bool = False) -> bool:
        if not self.ipc_alive:
            return self._fail(C.RES_E_INTERNAL_FAIL_INIT)
        self.initialized = True
        if login is not None:
            return self.login(login, password=password, server=server, timeout=timeout)
        self.logged_in = True
        return self._ok(True)

    def login(self, login: int, password: str | None = None, server: str | None = None, timeout: int | None = None) -> bool:
        if not self._alive():
            return False
        if login != self.account_login or (password is not None and password != self.account_password) \
                or (server is not None and server != self.account_server):
            self.logged_in = False
            return self._fail(C.RES_E_AUTH_FAILED)
        self.logged_in = True
        return self._ok(True)

    def shutdown(self) -> None:
        self.initialized = False
        return None

    def version(self) -> tuple[int, int, str] | None:
        if not self._alive():
            return None
        return self._ok((500, 5120, "24 Nov 2026"))

    def last_error(self) -> tuple[int, str]:
        return self._error

    def terminal_info(self) -> TerminalInfo | None:
        if not self._alive():
            return None
        return self._ok(TerminalInfo(False, False, self.server_connected, False, self.trade_allowed, False, False, False,
                                     False, False, 5120, 100_000, 0, 30_000, 0.0, 0.0, self.company, "MetaTrader 5",
                                     "English", "C:\\Fake\\MetaTrader 5", "C:\\Fake\\Data", "C:\\Fake\\Common"))

    def account_info(self) -> AccountInfo | None:
        if not self._alive():
            return None
        profit = sum(self._floating(p) for p in self.positions.values())
        margin = self._margin_used()
        equity = self.balance + profit
        level = equity / margin * 100.0 if margin > 0 else 0.0
        return self._ok(AccountInfo(self.account_login, C.ACCOUNT_TRADE_MODE_DEMO, self.leverage, 200,
                                    C.ACCOUNT_STOPOUT_MODE_PERCENT, True, True, self.margin_mode, 2, False, self.balance, 0.0,
                                    profit, equity, margin, equity - margin, level, 50.0, 30.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                    "Fake Trader", self.account_server, self.currency, self.company))

    # -- market data ---------------------------------------------------------------------------
    def symbol_select(self, symbol: str, enable: bool = True) -> bool:
        if not self._alive():
            return False
        if symbol not in self.symbols:
            return self._fail(C.RES_E_NOT_FOUND)
        self.symbols[symbol].selected = bool(enable)
        return self._ok(True)

    def symbol_info(self, symbol: str) -> SymbolInfo | None:
        if not self._alive():
            return None
        s = self.symbols.get(symbol)
        if s is None:
            return self._fail(C.RES_E_NOT_FOUND, None)
        q = self.quotes.get(symbol)
        bid, ask = (q.bid, q.ask) if q else (0.0, 0.0)
        spread = round((ask - bid) / s.point) if q else 0
        tick_value = s.contract_size * s.point * self._conv(s, bid or 1.0)
        values: dict[str, Any] = {name: 0 for name in SymbolInfo._fields}
        values.update(
            custom=False, select=s.selected, visible=s.selected, time=((q.time_ms + self.offset_ms) // 1000 if q else 0),
            digits=s.digits, spread=spread, spread_float=True, trade_calc_mode=C.SYMBOL_CALC_MODE_FOREX,
            trade_mode=s.trade_mode, trade_stops_level=s.stops_level, trade_freeze_level=s.freeze_level,
            trade_exemode=s.exemode, filling_mode=s.filling_mode, order_mode=127, bid=bid, bidhigh=bid, bidlow=bid,
            ask=ask, askhigh=ask, asklow=ask, last=0.0, lasthigh=0.0, lastlow=0.0, volume_real=0.0, volumehigh_real=0.0,
            volumelow_real=0.0, option_strike=0.0, point=s.point, trade_tick_value=tick_value,
            trade_tick_value_profit=tick_value, trade_tick_value_loss=tick_value, trade_tick_size=s.point,
            trade_contract_size=s.contract_size, volume_min=s.volume_min, volume_max=s.volume_max,
            volume_step=s.volume_step, volume_limit=0.0, margin_hedged=s.contract_size, basis="", category="",
            currency_base=s.currency_base, currency_profit=s.currency_profit, currency_margin=s.currency_base,
            bank="", description=f"{s.currency_base} vs {s.currency_profit}", exchange="", formula="", isin="",
            name=s.name, page="", path=f"Fake\\{s.name}",
        )
        for name in SymbolInfo._fields:  # the float fields left at 0 stay floats
            if isinstance(values[name], int) and name not in _INT_SYMBOL_FIELDS:
                values[name] = float(values[name])
        return self._ok(SymbolInfo(**values))

    def symbol_info_tick(self, symbol: str) -> Tick | None:
        if not self._alive():
            return None
        s, q = self.symbols.get(symbol), self.quotes.get(symbol)
        if s is None or q is None or not s.selected:
            return self._fail(C.RES_E_NOT_FOUND, None)
        t = q.time_ms + self.offset_ms
        return self._ok(Tick(t // 1000, q.bid, q.ask, 0.0, 0, t, C.TICK_FLAG_BID | C.TICK_FLAG_ASK, 0.0))

    # -- trading -------------------------------------------------------------------------------
    def order_check(self, request: dict) -> OrderCheckResult | None:
        if not self._alive():
            return None
        req = self._request(request)
        if req is None:
            return None
        code, comment = self._validate(req)
        profit = sum(self._floating(p) for p in self.positions.values())
        equity = self.balance + profit
        margin = self._margin_used() + (self._margin_of(req) if code == 0 else 0.0)
        level = equity / margin * 100.0 if margin > 0 else 0.0
        return self._ok(OrderCheckResult(code, self.balance, equity, profit, margin, equity - margin, level,
                                         comment or "Done", req))

    def order_send(self, request: dict) -> OrderSendResult | None:
        if not self._alive():
            return None
        req = self._request(request)
        if req is None:
            return None
        self.calls.append(("order_send", req))
        self._request_id += 1
        fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            if fault.kind == "retcode":
                return self._answer(req, fault.retcode, comment=fault.comment)
            if fault.kind == "requote" and req.action == C.TRADE_ACTION_DEAL:
                self._move_against(req, fault.move_points)
                return self._answer(req, fault.retcode)
            if fault.kind == "late":
                self._late.append(request)
                return self._fail(C.RES_E_INTERNAL_FAIL_TIMEOUT, None)
            if fault.kind == "lost":
                if fault.after_execution:
                    self._execute(req)
                if fault.answer == "none":
                    return self._fail(C.RES_E_INTERNAL_FAIL_TIMEOUT, None)
                code = C.TRADE_RETCODE_TIMEOUT if fault.answer == "timeout" else C.TRADE_RETCODE_CONNECTION
                return self._answer(req, code)
        return self._execute(req)

    def orders_get(self, symbol: str | None = None, group: str | None = None, ticket: int | None = None) -> tuple | None:
        if not self._alive():
            return None
        orders = [o for o in self.open_orders.values() if _selected(o.symbol, o.ticket, symbol, group, ticket)]
        return self._ok(tuple(o.record(self.offset_ms, self._current(o.symbol, o.type)) for o in orders))

    def orders_total(self) -> int | None:
        orders = self.orders_get()
        return None if orders is None else len(orders)

    def positions_get(self, symbol: str | None = None, group: str | None = None, ticket: int | None = None) -> tuple | None:
        if not self._alive():
            return None
        rows = [self._position_record(p) for p in self.positions.values() if _selected(p.symbol, p.ticket, symbol, group, ticket)]
        return self._ok(tuple(rows))

    def positions_total(self) -> int | None:
        positions = self.positions_get()
        return None if positions is None else len(positions)

    def history_orders_get(self, date_from: Any = None, date_to: Any = None, group: str | None = None,
                           ticket: int | None = None, position: int | None = None) -> tuple | None:
        if not self._alive():
            return None
        if ticket is not None:
            orders = [o for o in self.history_orders.values() if o.ticket == ticket]
        elif position is not None:
            orders = [o for o in self.history_orders.values() if o.position_id == position]
        else:
            if date_from is None or date_to is None:
                return self._fail(C.RES_E_INVALID_PARAMS, None)
            lo, hi = _server_seconds(date_from), _server_seconds(date_to)
            orders = [o for o in self.history_orders.values()
                      if lo <= (o.setup_ms + self.offset_ms) // 1000 <= hi and _selected(o.symbol, o.ticket, None, group, None)]
        return self._ok(tuple(o.record(self.offset_ms, 0.0) for o in sorted(orders, key=lambda o: o.ticket)))

    def history_deals_get(self, date_from: Any = None, date_to: Any = None, group: str | None = None,
                          ticket: int | None = None, position: int | None = None) -> tuple | None:
        if not self._alive():
            return None
        if ticket is not None:  # the package's ticket= selects the deals of an ORDER ticket
            deals = [d for d in self.deals if d.order == ticket]
        elif position is not None:
            deals = [d for d in self.deals if d.position_id == position]
        else:
            if date_from is None or date_to is None:
                return self._fail(C.RES_E_INVALID_PARAMS, None)
            lo, hi = _server_seconds(date_from), _server_seconds(date_to)
            deals = [d for d in self.deals if lo <= d.time <= hi and _selected(d.symbol, d.ticket, None, group, None)]
        return self._ok(tuple(deals))

    def history_orders_total(self, date_from: Any, date_to: Any) -> int | None:
        orders = self.history_orders_get(date_from, date_to)
        return None if orders is None else len(orders)

    def history_deals_total(self, date_from: Any, date_to: Any) -> int | None:
        deals = self.history_deals_get(date_from, date_to)
        return None if deals is None else len(deals)

    # -- internals: errors -------------------------------------------------------------------
    def _alive(self) -> bool:
        if not self.ipc_alive or not self.initialized:
            self._error = (C.RES_E_INTERNAL_FAIL_CONNECT, C.LAST_ERROR_TEXT[C.RES_E_INTERNAL_FAIL_CONNECT])
            return False
        return True

    def _ok(self, value: Any) -> Any:
        self._error = (C.RES_S_OK, C.LAST_ERROR_TEXT[C.RES_S_OK])
        return value

    def _fail(self, code: int, value: Any = False) -> Any:
        self._error = (code, C.LAST_ERROR_TEXT[code])
        return value

    # -- internals: requests -------------------------------------------------------------------
    def _request(self, request: Any) -> TradeRequest | None:
        if not isinstance(request, dict):
            return self._fail(C.RES_E_INVALID_PARAMS, None)
        unknown = set(request) - set(TradeRequest._fields)
        if unknown:
            return self._fail(C.RES_E_INVALID_PARAMS, None)
        try:
            values = {k: type(TradeRequest._field_defaults[k])(v) for k, v in request.items()}
        except (TypeError, ValueError):
            return self._fail(C.RES_E_INVALID_PARAMS, None)
        return TradeRequest(**values)

    def _answer(self, req: TradeRequest, code: int, *, order: int = 0, deal: int = 0, volume: float = 0.0,
                price: float = 0.0, comment: str = "") -> OrderSendResult:
        q = self.quotes.get(req.symbol)
        bid, ask = (q.bid, q.ask) if q else (0.0, 0.0)
        return self._ok(OrderSendResult(code, deal, order, volume, price, bid, ask, comment or C.RETCODE_TEXT.get(code, ""),
                                        self._request_id, 0, req))

    def _validate(self, req: TradeRequest) -> tuple[int, str]:
        """0 when the request may be executed now, else a return code and the reason."""
        if not self.server_connected:
            return C.TRADE_RETCODE_CONNECTION, "No connection"
        if not self.trade_allowed:
            return C.TRADE_RETCODE_CLIENT_DISABLES_AT, "AutoTrading disabled by client"
        if req.action == C.TRADE_ACTION_SLTP:
            return self._validate_sltp(req)
        if req.action == C.TRADE_ACTION_REMOVE:
            return (0, "") if req.order in self.open_orders else (C.TRADE_RETCODE_INVALID_ORDER, "Invalid order")
        if req.action not in (C.TRADE_ACTION_DEAL, C.TRADE_ACTION_PENDING):
            return C.TRADE_RETCODE_INVALID_ORDER, "Unsupported trade action"
        s = self.symbols.get(req.symbol)
        if s is None or req.symbol not in self.quotes:
            return C.TRADE_RETCODE_INVALID, "Invalid request: unknown symbol"
        if req.symbol in self.closed_markets:
            return C.TRADE_RETCODE_MARKET_CLOSED, "Market closed"
        closing = self._closing_position(req)
        if s.trade_mode == C.SYMBOL_TRADE_MODE_DISABLED:
            return C.TRADE_RETCODE_TRADE_DISABLED, "Trade disabled"
        if s.trade_mode == C.SYMBOL_TRADE_MODE_CLOSEONLY and closing is None:
            return C.TRADE_RETCODE_CLOSE_ONLY, "Only position closing is allowed"
        buy = req.type in _BUY_TYPES
        if s.trade_mode == C.SYMBOL_TRADE_MODE_LONGONLY and not buy and closing is None:
            return C.TRADE_RETCODE_LONG_ONLY, "Only long positions are allowed"
        if s.trade_mode == C.SYMBOL_TRADE_MODE_SHORTONLY and buy and closing is None:
            return C.TRADE_RETCODE_SHORT_ONLY, "Only short positions are allowed"
        if req.action == C.TRADE_ACTION_DEAL and req.type not in (C.ORDER_TYPE_BUY, C.ORDER_TYPE_SELL):
            return C.TRADE_RETCODE_INVALID_ORDER, "Invalid order type"
        if req.action == C.TRADE_ACTION_PENDING and req.type not in _PENDING_TYPES:
            return C.TRADE_RETCODE_INVALID_ORDER, "Invalid order type"
        steps = req.volume / s.volume_step
        if req.volume < s.volume_min - _EPS or req.volume > s.volume_max + _EPS or abs(steps - round(steps)) > 1e-7:
            return C.TRADE_RETCODE_INVALID_VOLUME, "Invalid volume"
        if req.type_filling == C.ORDER_FILLING_FOK and not s.filling_mode & C.SYMBOL_FILLING_FOK \
                or req.type_filling == C.ORDER_FILLING_IOC and not s.filling_mode & C.SYMBOL_FILLING_IOC \
                or req.type_filling == C.ORDER_FILLING_BOC:
            return C.TRADE_RETCODE_INVALID_FILL, "Unsupported filling mode"
        q = self.quotes[req.symbol]
        level = s.stops_level * s.point
        if req.action == C.TRADE_ACTION_DEAL:
            if req.position:
                if closing is None:
                    return C.TRADE_RETCODE_POSITION_CLOSED, "Position doesn't exist"
                if (closing.type == C.POSITION_TYPE_BUY) == buy:
                    return C.TRADE_RETCODE_INVALID, "Invalid request: a close must be opposite to the position"
                if req.volume > closing.volume + _EPS:
                    return C.TRADE_RETCODE_INVALID_CLOSE_VOLUME, "Close volume exceeds the position's"
            if s.exemode in (C.SYMBOL_TRADE_EXECUTION_INSTANT, C.SYMBOL_TRADE_EXECUTION_REQUEST):
                market = q.ask if buy else q.bid
                if req.price <= 0:
                    return C.TRADE_RETCODE_INVALID_PRICE, "Invalid price"
                if abs(req.price - market) > req.deviation * s.point + _EPS:
                    return C.TRADE_RETCODE_REQUOTE, "Requote"
            ref = q.bid if buy else q.ask  # a buy position closes at the bid, a sell at the ask
            code = _check_stops(buy, ref, req.sl, req.tp, level)
            if code:
                return code, "Invalid stops"
        else:
            price = req.price
            if price <= 0:
                return C.TRADE_RETCODE_INVALID_PRICE, "Invalid price"
            if req.type == C.ORDER_TYPE_BUY_LIMIT and price > q.ask - level + _EPS \
                    or req.type == C.ORDER_TYPE_SELL_LIMIT and price < q.bid + level - _EPS \
                    or req.type == C.ORDER_TYPE_BUY_STOP and price < q.ask + level - _EPS \
                    or req.type == C.ORDER_TYPE_SELL_STOP and price > q.bid - level + _EPS:
                return C.TRADE_RETCODE_INVALID_PRICE, "Invalid price"
            code = _check_stops(buy, price, req.sl, req.tp, level)
            if code:
                return code, "Invalid stops"
            if req.type_time == C.ORDER_TIME_SPECIFIED and req.expiration <= (self.now_ms + self.offset_ms) // 1000:
                return C.TRADE_RETCODE_INVALID_EXPIRATION, "Invalid expiration"
        if closing is None and self._margin_of(req) > self._free_margin() + _EPS:
            return C.TRADE_RETCODE_NO_MONEY, "No money"
        return 0, ""

    def _validate_sltp(self, req: TradeRequest) -> tuple[int, str]:
        pos = self.positions.get(req.position)
        if pos is None:
            return C.TRADE_RETCODE_POSITION_CLOSED, "Position doesn't exist"
        s, q = self.symbols[pos.symbol], self.quotes[pos.symbol]
        buy = pos.type == C.POSITION_TYPE_BUY
        code = _check_stops(buy, q.bid if buy else q.ask, req.sl, req.tp, s.stops_level * s.point)
        if code:
            return code, "Invalid stops"
        if abs(req.sl - pos.sl) < _EPS and abs(req.tp - pos.tp) < _EPS:
            return C.TRADE_RETCODE_NO_CHANGES, "No changes"
        return 0, ""

    def _closing_position(self, req: TradeRequest) -> _Position | None:
        if req.position:
            return self.positions.get(req.position)
        if self.margin_mode != C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING and req.action == C.TRADE_ACTION_DEAL:
            pos = self._netting_position(req.symbol)
            if pos is not None and (pos.type == C.POSITION_TYPE_BUY) != (req.type == C.ORDER_TYPE_BUY) \
                    and req.volume <= pos.volume + _EPS:
                return pos  # an opposite deal no larger than the position only reduces it
        return None

    def _execute(self, req: TradeRequest | None, reason: int = C.ORDER_REASON_EXPERT) -> OrderSendResult | None:
        if req is None:
            return None
        code, comment = self._validate(req)
        if code:
            return self._answer(req, code, comment=comment)
        if req.action == C.TRADE_ACTION_SLTP:
            pos = self.positions[req.position]
            pos.sl, pos.tp, pos.update_ms = req.sl, req.tp, self.now_ms
            return self._answer(req, C.TRADE_RETCODE_DONE)
        if req.action == C.TRADE_ACTION_REMOVE:
            order = self.open_orders.pop(req.order)
            order.state, order.done_ms = C.ORDER_STATE_CANCELED, self.now_ms
            self.history_orders[order.ticket] = order
            return self._answer(req, C.TRADE_RETCODE_DONE, order=order.ticket)
        self._ticket += 1
        ticket = self._ticket
        expiration = req.expiration if req.type_time == C.ORDER_TIME_SPECIFIED else 0
        order = _Order(ticket, req.symbol, req.type, req.volume, req.volume, req.price, req.sl, req.tp, req.magic,
                       req.comment, reason, req.type_filling, req.type_time, expiration, self.now_ms, C.ORDER_STATE_STARTED,
                       position=req.position)
        if req.action == C.TRADE_ACTION_PENDING:
            order.state = C.ORDER_STATE_PLACED
            self.open_orders[ticket] = order
            return self._answer(req, C.TRADE_RETCODE_PLACED, order=ticket, volume=req.volume, price=req.price)
        q = self.quotes[req.symbol]
        price = q.ask if req.type == C.ORDER_TYPE_BUY else q.bid
        available = self.liquidity.get(req.symbol, math.inf)
        volume = req.volume
        if volume > available + _EPS:
            if req.type_filling == C.ORDER_FILLING_FOK:
                order.state, order.done_ms = C.ORDER_STATE_REJECTED, self.now_ms
                self.history_orders[ticket] = order
                return self._answer(req, C.TRADE_RETCODE_REJECT, order=ticket, comment="No liquidity to fill the whole volume")
            volume = _floor_step(available, self.symbols[req.symbol].volume_step)
        deal = self._deal(order, volume, price, reason)
        order.volume_current = round(order.volume_initial - volume, 8)
        partial = order.volume_current > _EPS
        if partial and req.type_filling == C.ORDER_FILLING_RETURN:
            order.state = C.ORDER_STATE_PARTIAL  # the rest keeps working
            self.open_orders[ticket] = order
        else:
            order.state = C.ORDER_STATE_PARTIAL if partial else C.ORDER_STATE_FILLED
            order.done_ms = self.now_ms
            self.history_orders[ticket] = order
        code = C.TRADE_RETCODE_DONE_PARTIAL if partial else C.TRADE_RETCODE_DONE
        return self._answer(req, code, order=ticket, deal=deal.ticket if deal else 0, volume=volume, price=price,
                            comment="Request executed partially" if partial else "Request executed")

    def _run_late(self) -> None:
        late, self._late = self._late, []
        for request in late:
            self._execute(self._request(request))

    def _retry_return_orders(self, symbol: str) -> None:
        for order in [o for o in self.open_orders.values() if o.symbol == symbol and o.type in (C.ORDER_TYPE_BUY, C.ORDER_TYPE_SELL)]:
            available = self.liquidity.get(symbol, math.inf)
            volume = min(order.volume_current, _floor_step(available, self.symbols[symbol].volume_step))
            if volume <= _EPS:
                continue
            q = self.quotes[symbol]
            self._deal(order, volume, q.ask if order.type == C.ORDER_TYPE_BUY else q.bid, order.reason)
            order.volume_current = round(order.volume_current - volume, 8)
            if order.volume_current <= _EPS:
                order.state, order.done_ms = C.ORDER_STATE_FILLED, self.now_ms
                self.history_orders[order.ticket] = self.open_orders.pop(order.ticket)

    def _expire_orders(self) -> None:
        now_s = (self.now_ms + self.offset_ms) // 1000
        for order in [o for o in self.open_orders.values() if o.time_expiration and o.time_expiration <= now_s]:
            order.state, order.done_ms = C.ORDER_STATE_EXPIRED, self.now_ms
            self.history_orders[order.ticket] = self.open_orders.pop(order.ticket)

    def _move_against(self, req: TradeRequest, points: int) -> None:
        s, q = self.symbols[req.symbol], self.quotes[req.symbol]
        move = points * s.point * (1 if req.type == C.ORDER_TYPE_BUY else -1)
        self.quotes[req.symbol] = _Quote(q.bid + move, q.ask + move, self.now_ms)

    # -- internals: matching ---------------------------------------------------------------------
    def _deal(self, order: _Order, volume: float, price: float, reason: int, comment: str | None = None) -> TradeDeal:
        """Book an execution of ``order``: netting or hedging, entry in/out/in-out, profit,
        commission."""
        s = self.symbols[order.symbol]
        buy = order.type in _BUY_TYPES
        pos_type = C.POSITION_TYPE_BUY if buy else C.POSITION_TYPE_SELL
        entry, profit, position_id = C.DEAL_ENTRY_IN, 0.0, order.ticket
        if order.position:
            pos = self.positions[order.position]
            profit = self._close(pos, volume, price)
            entry, position_id = C.DEAL_ENTRY_OUT, pos.identifier
        elif self.margin_mode == C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING:
            self._open(order, position_id, pos_type, volume, price)
        else:
            pos = self._netting_position(order.symbol)
            if pos is None:
                self._open(order, position_id, pos_type, volume, price)
            elif pos.type == pos_type:  # adds: average price; the new order's stops replace the old
                pos.price_open = (pos.price_open * pos.volume + price * volume) / (pos.volume + volume)
                pos.volume = round(pos.volume + volume, 8)
                pos.sl, pos.tp = (order.sl or pos.sl), (order.tp or pos.tp)
                pos.update_ms, position_id = self.now_ms, pos.identifier
            else:
                position_id = pos.identifier
                closing = min(volume, pos.volume)
                profit = self._close(pos, closing, price)
                entry = C.DEAL_ENTRY_OUT
                rest = round(volume - closing, 8)
                if rest > _EPS:  # a reversal: the position turns, its identifier stays
                    entry = C.DEAL_ENTRY_INOUT
                    self.positions[pos.ticket] = replace(pos, type=pos_type, volume=rest, price_open=price, sl=order.sl,
                                                         tp=order.tp, update_ms=self.now_ms)
        order.position_id = position_id
        commission = -self.commission_per_lot * volume
        self.balance += profit + commission
        self._deal_ticket += 1
        t = self.now_ms + self.offset_ms
        deal = TradeDeal(self._deal_ticket, order.ticket, t // 1000, t, C.DEAL_TYPE_BUY if buy else C.DEAL_TYPE_SELL, entry,
                         order.magic, position_id, _DEAL_REASON.get(reason, C.DEAL_REASON_EXPERT), volume, price, commission,
                         0.0, round(profit, 2), 0.0, order.symbol, order.comment if comment is None else comment, "")
        self.deals.append(deal)
        return deal

    def _open(self, order: _Order, identifier: int, pos_type: int, volume: float, price: float) -> None:
        self.positions[identifier] = _Position(identifier, identifier, order.symbol, pos_type, volume, price, order.sl,
                                               order.tp, order.magic, order.comment, order.reason, self.now_ms, self.now_ms)

    def _close(self, pos: _Position, volume: float, price: float) -> float:
        s = self.symbols[pos.symbol]
        sign = 1 if pos.type == C.POSITION_TYPE_BUY else -1
        profit = sign * (price - pos.price_open) * volume * s.contract_size * self._conv(s, price)
        pos.volume = round(pos.volume - volume, 8)
        pos.update_ms = self.now_ms
        if pos.volume <= _EPS:
            del self.positions[pos.ticket]
        return profit

    def _netting_position(self, symbol: str) -> _Position | None:
        return next((p for p in self.positions.values() if p.symbol == symbol), None)

    def _trigger(self, symbol: str, old: _Quote, new: _Quote, continuous: bool) -> None:
        """Pending orders and stops reached on the way from ``old`` to ``new``, in path order
        (a position opened on the way is watched from where it opened)."""
        done = 0.0
        while True:
            hits = []
            for order in self.open_orders.values():
                if order.symbol == symbol and order.type in _PENDING_TYPES:
                    hit = _crossing(old, new, order.price_open, order.type)
                    if hit is not None:
                        hits.append((hit[0], 1, order.ticket, "order", order, hit[1]))
            for pos in self.positions.values():
                if pos.symbol != symbol:
                    continue
                buy = pos.type == C.POSITION_TYPE_BUY
                if pos.sl:
                    hit = _crossing(old, new, pos.sl, C.ORDER_TYPE_SELL_STOP if buy else C.ORDER_TYPE_BUY_STOP)
                    if hit is not None:
                        hits.append((hit[0], 0, pos.ticket, "sl", pos, hit[1]))
                if pos.tp:
                    hit = _crossing(old, new, pos.tp, C.ORDER_TYPE_SELL_LIMIT if buy else C.ORDER_TYPE_BUY_LIMIT)
                    if hit is not None:
                        hits.append((hit[0], 0, pos.ticket, "tp", pos, hit[1]))
            hits = [h for h in hits if h[0] >= done - _EPS]
            if not hits:
                return
            done, _, _, kind, item, price = min(hits, key=lambda h: (h[0], h[1], h[2]))
            fill = price if continuous else _jump_price(item, kind, new)
            if kind == "order":
                self._fill_pending(item, fill)
            else:
                self._stop_out_position(item, kind, fill)

    def _fill_pending(self, order: _Order, price: float) -> None:
        del self.open_orders[order.ticket]
        self._deal(order, order.volume_current, price, order.reason)
        order.volume_current, order.state, order.done_ms = 0.0, C.ORDER_STATE_FILLED, self.now_ms
        self.history_orders[order.ticket] = order

    def _stop_out_position(self, pos: _Position, kind: str, price: float) -> None:
        """The server closes a position at its stop loss or take profit: an order and a deal
        with reason SL/TP and the comment MetaTrader writes, e.g. ``[sl 1.08250]``."""
        s = self.symbols[pos.symbol]
        level = pos.sl if kind == "sl" else pos.tp
        comment = f"[{kind} {level:.{s.digits}f}]"
        reason = C.ORDER_REASON_SL if kind == "sl" else C.ORDER_REASON_TP
        self._ticket += 1
        close_type = C.ORDER_TYPE_SELL if pos.type == C.POSITION_TYPE_BUY else C.ORDER_TYPE_BUY
        order = _Order(self._ticket, pos.symbol, close_type, pos.volume, 0.0, level, 0.0, 0.0, pos.magic, comment, reason,
                       C.ORDER_FILLING_FOK, C.ORDER_TIME_GTC, 0, self.now_ms, C.ORDER_STATE_FILLED, self.now_ms,
                       position=pos.ticket)
        self._deal(order, pos.volume, price, reason, comment)
        self.history_orders[order.ticket] = order

    # -- internals: money ----------------------------------------------------------------------
    def _conv(self, s: FakeSymbol, price: float) -> float:
        """Quote (profit) currency -> account currency, as MetaTrader converts profit."""
        spec = instrument(s.name)
        mode = conversion_mode(spec, self.currency)
        if mode is ConvMode.ONE:
            return 1.0
        if mode is ConvMode.INVERSE:
            return 1.0 / price
        pair, invert = cross_pair(s.currency_profit, self.currency)
        q = self.quotes.get(pair)
        if q is None:
            raise ValueError(f"the fake terminal needs a {pair} quote to convert {s.name}'s profit into {self.currency}")
        mid = (q.bid + q.ask) / 2
        return 1.0 / mid if invert else mid

    def _current(self, symbol: str, type_: int) -> float:
        q = self.quotes.get(symbol)
        if q is None:
            return 0.0
        return q.ask if type_ in _BUY_TYPES else q.bid

    def _floating(self, pos: _Position) -> float:
        s, q = self.symbols[pos.symbol], self.quotes[pos.symbol]
        price = q.bid if pos.type == C.POSITION_TYPE_BUY else q.ask
        sign = 1 if pos.type == C.POSITION_TYPE_BUY else -1
        return sign * (price - pos.price_open) * pos.volume * s.contract_size * self._conv(s, price)

    def _position_record(self, p: _Position) -> TradePosition:
        q = self.quotes[p.symbol]
        current = q.bid if p.type == C.POSITION_TYPE_BUY else q.ask
        t, u = p.time_ms + self.offset_ms, p.update_ms + self.offset_ms
        return TradePosition(p.ticket, t // 1000, t, u // 1000, u, p.type, p.magic, p.identifier, p.reason, p.volume,
                             p.price_open, p.sl, p.tp, current, 0.0, round(self._floating(p), 2), p.symbol, p.comment, "")

    def _margin_of_volume(self, symbol: str, volume: float, price: float) -> float:
        s = self.symbols[symbol]
        return volume * s.contract_size * price * self._conv(s, price) / s.leverage

    def _margin_used(self) -> float:
        return sum(self._margin_of_volume(p.symbol, p.volume, p.price_open) for p in self.positions.values())

    def _margin_of(self, req: TradeRequest) -> float:
        """The margin a request adds (netting: only the part that grows the position)."""
        if req.action not in (C.TRADE_ACTION_DEAL, C.TRADE_ACTION_PENDING) or req.symbol not in self.quotes:
            return 0.0
        q = self.quotes[req.symbol]
        price = req.price if req.action == C.TRADE_ACTION_PENDING else (q.ask if req.type in _BUY_TYPES else q.bid)
        volume = req.volume
        if self.margin_mode != C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING and req.action == C.TRADE_ACTION_DEAL:
            pos = self._netting_position(req.symbol)
            if pos is not None and (pos.type == C.POSITION_TYPE_BUY) != (req.type in _BUY_TYPES):
                volume = max(volume - 2 * pos.volume, 0.0)  # closing frees the position's margin first
        return self._margin_of_volume(req.symbol, volume, price)

    def _free_margin(self) -> float:
        equity = self.balance + sum(self._floating(p) for p in self.positions.values())
        return equity - self._margin_used()


_INT_SYMBOL_FIELDS = {"chart_mode", "session_deals", "session_buy_orders", "session_sell_orders", "volume", "volumehigh",
                      "volumelow", "time", "digits", "spread", "ticks_bookdepth", "trade_calc_mode", "trade_mode",
                      "start_time", "expiration_time", "trade_stops_level", "trade_freeze_level", "trade_exemode",
                      "swap_mode", "swap_rollover3days", "expiration_mode", "filling_mode", "order_mode", "order_gtc_mode",
                      "option_mode", "option_right"}
_DEAL_REASON = {C.ORDER_REASON_CLIENT: C.DEAL_REASON_CLIENT, C.ORDER_REASON_MOBILE: C.DEAL_REASON_MOBILE,
                C.ORDER_REASON_WEB: C.DEAL_REASON_WEB, C.ORDER_REASON_EXPERT: C.DEAL_REASON_EXPERT,
                C.ORDER_REASON_SL: C.DEAL_REASON_SL, C.ORDER_REASON_TP: C.DEAL_REASON_TP, C.ORDER_REASON_SO: C.DEAL_REASON_SO}


def _check_stops(buy: bool, ref: float, sl: float, tp: float, level: float) -> int:
    """MetaTrader's rule: a buy's stop loss below and take profit above the reference price
    by more than the stops level (a sell's the other way round)."""
    if sl:
        if (buy and sl > ref - level + _EPS) or (not buy and sl < ref + level - _EPS):
            return C.TRADE_RETCODE_INVALID_STOPS
    if tp:
        if (buy and tp < ref + level - _EPS) or (not buy and tp > ref - level + _EPS):
            return C.TRADE_RETCODE_INVALID_STOPS
    return 0


def _crossing(old: _Quote, new: _Quote, level: float, type_: int) -> tuple[float, float] | None:
    """Where along the move from ``old`` to ``new`` an order of ``type_`` at ``level`` triggers:
    (fraction of the path, level), or None. Buy orders watch the ask, sell orders the bid;
    limits trigger at or beyond the level from the favourable side, stops from the other."""
    buy = type_ in _BUY_TYPES
    a, b = (old.ask, new.ask) if buy else (old.bid, new.bid)
    # buy limit / sell stop: trigger when the price falls to the level; buy stop / sell limit: rises to it
    falls = (type_ == C.ORDER_TYPE_BUY_LIMIT) or (type_ == C.ORDER_TYPE_SELL_STOP)
    if falls:
        if b > level + _EPS:
            return None
        if a <= level + _EPS:
            return 0.0, a
        return (a - level) / (a - b), level
    if b < level - _EPS:
        return None
    if a >= level - _EPS:
        return 0.0, a
    return (level - a) / (b - a), level


def _jump_price(item: Any, kind: str, new: _Quote) -> float:
    """The fill of an order the market jumped through: the new quote on its side."""
    if kind == "order":
        return new.ask if item.type in _BUY_TYPES else new.bid
    return new.bid if item.type == C.POSITION_TYPE_BUY else new.ask


def _floor_step(volume: float, step: float) -> float:
    if math.isinf(volume):
        return volume
    return round(math.floor(volume / step + 1e-9) * step, 8)


def _server_seconds(value: Any) -> int:
    """A history bound as the package takes it: a datetime (naive ones read as UTC wall time
    of the server) or seconds since 1970."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return int((value - datetime(1970, 1, 1)).total_seconds())
        return int(value.timestamp())
    return int(value)


def _selected(symbol: str, ticket: int, want_symbol: str | None, group: str | None, want_ticket: int | None) -> bool:
    if want_ticket is not None:
        return ticket == want_ticket
    if want_symbol is not None:
        return symbol == want_symbol
    if group:
        return _group_match(symbol, group)
    return True


def _group_match(symbol: str, group: str) -> bool:
    """MetaTrader's group filter: comma-separated masks with ``*``; ``!`` excludes."""
    included = False
    for mask in (m.strip() for m in group.split(",") if m.strip()):
        if mask.startswith("!"):
            if fnmatch.fnmatchcase(symbol, mask[1:]):
                return False
        elif fnmatch.fnmatchcase(symbol, mask):
            included = True
    return included
