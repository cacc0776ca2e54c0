"""Positions, cash and round-trip trades, in the account currency.

A netting account: one position per symbol, in units (lots x contract size), with its average
price. Realised PnL is converted at the closing fill's rate, unrealised PnL at the mark's;
commissions come off the balance when charged. A trade is a round trip from flat to flat
(a reversal closes one and opens the next); its commissions are the entry's and exit's shares.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from models.trading.broker import Fill


@dataclass(slots=True)
class Trade:
    trade_id: int
    symbol: str
    side: int  # +1 long, -1 short
    qty: float  # units at its largest
    entry_ts: int
    entry_price: float  # average
    entry_conv: float
    entry_equity: float  # account equity when it opened (for returns on equity)
    initial_stop: float | None
    risk: float | None  # money lost at the initial stop, account currency
    exit_ts: int | None = None
    exit_price: float | None = None
    exit_reason: str = ""
    gross_pnl: float = 0.0  # account currency, before commissions
    commission: float = 0.0
    exit_qty: float = 0.0
    cost_spread: float = 0.0  # what crossing the spread and slippage cost, account currency

    @property
    def pnl(self) -> float:
        return self.gross_pnl - self.commission

    @property
    def is_open(self) -> bool:
        return self.exit_ts is None  # exit_price may hold a partial exit's average meanwhile

    @property
    def return_pct(self) -> float:
        """Net PnL over the entry notional (account currency)."""
        return self.pnl / (self.qty * self.entry_price * self.entry_conv)

    @property
    def r_multiple(self) -> float | None:
        return self.pnl / self.risk if self.risk else None

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _TRADE_FIELDS}


_TRADE_FIELDS = tuple(f.name for f in fields(Trade))


class Position:
    __slots__ = ("units", "avg")

    def __init__(self, units: float = 0.0, avg: float = 0.0) -> None:
        self.units = units
        self.avg = avg


class Portfolio:
    def __init__(self, initial_equity: float) -> None:
        self.initial_equity = initial_equity
        self.balance = initial_equity
        self.positions: dict[str, Position] = {}
        self.trades: list[Trade] = []
        self.open_trades: dict[str, Trade] = {}
        self.commission_total = 0.0
        self.cost_total = 0.0  # spread and slippage paid, account currency
        self.traded_notional = 0.0  # account currency, for turnover

    def position(self, symbol: str) -> Position:
        pos = self.positions.get(symbol)
        if pos is None:
            pos = self.positions[symbol] = Position()
        return pos

    def apply_fill(self, fill: Fill, equity: float, stop: float | None, reason: str) -> None:
        """Book one execution. ``equity`` is the account's before it (for the trade's record),
        ``stop`` the protective stop of an entry (for its R), ``reason`` why it closed one."""
        pos = self.positions.get(fill.symbol) or self.position(fill.symbol)
        q, side, x, price, conv = pos.units, int(fill.side), fill.qty, fill.price, fill.conv
        self.balance -= fill.commission
        self.commission_total += fill.commission
        cost = abs(price - fill.mid) * x * conv
        self.cost_total += cost
        self.traded_notional += x * price * conv
        if q == 0 or (q > 0) == (side > 0):
            total = abs(q) + x
            pos.avg = (pos.avg * abs(q) + price * x) / total
            pos.units = q + side * x
            trade = self.open_trades.get(fill.symbol)
            if trade is None:
                trade = self._open(fill, x, equity, stop)
            else:
                trade.qty = total
                trade.entry_price = pos.avg
            trade.commission += fill.commission
            trade.cost_spread += cost
            return
        closing = min(x, abs(q))
        pnl = closing * (price - pos.avg) * (1 if q > 0 else -1) * conv
        self.balance += pnl
        trade = self.open_trades[fill.symbol]
        share = closing / x
        trade.gross_pnl += pnl
        trade.commission += fill.commission * share
        trade.cost_spread += cost * share
        if trade.exit_qty:
            trade.exit_price = (trade.exit_price * trade.exit_qty + price * closing) / (trade.exit_qty + closing)
        else:
            trade.exit_price = price
        trade.exit_qty += closing
        if closing >= abs(q) - 1e-9 * abs(q):
            trade.exit_ts, trade.exit_reason = fill.ts, reason
            del self.open_trades[fill.symbol]
            rest = x - closing
            if rest > 1e-9 * x:
                pos.units, pos.avg = side * rest, price
                new = self._open(fill, rest, equity + pnl - fill.commission * share, stop)
                new.commission += fill.commission * (1 - share)
                new.cost_spread += cost * (1 - share)
            else:
                pos.units, pos.avg = 0.0, 0.0
        else:
            pos.units = q + side * x

    def _open(self, fill: Fill, qty: float, equity: float, stop: float | None) -> Trade:
        risk = abs(fill.price - stop) * qty * fill.conv if stop else None
        trade = Trade(len(self.trades) + 1, fill.symbol, int(fill.side), qty, fill.ts, fill.price, fill.conv,
                      equity, stop, risk)
        self.trades.append(trade)
        self.open_trades[fill.symbol] = trade
        return trade

    def snapshot(self) -> dict:
        return {
            "initial_equity": self.initial_equity, "balance": self.balance,
            "positions": {s: [p.units, p.avg] for s, p in self.positions.items()},
            "trades": [t.to_dict() for t in self.trades],
            "open": {s: t.trade_id for s, t in self.open_trades.items()},
            "commission_total": self.commission_total, "cost_total": self.cost_total,
            "traded_notional": self.traded_notional,
        }

    @classmethod
    def restore(cls, state: dict) -> Portfolio:
        self = cls(state["initial_equity"])
        self.balance = state["balance"]
        self.positions = {s: Position(u, a) for s, (u, a) in state["positions"].items()}
        self.trades = [Trade(**t) for t in state["trades"]]
        self.open_trades = {s: self.trades[i - 1] for s, i in state["open"].items()}
        self.commission_total, self.cost_total = state["commission_total"], state["cost_total"]
        self.traded_notional = state["traded_notional"]
        return self
