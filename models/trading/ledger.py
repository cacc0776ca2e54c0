"""What the engine believes it holds, for a broker to check at start (reconciliation).

A :class:`Ledger` is the engine's positions and its orders that were not finished when its
state was saved, read from :meth:`TradingEngine.snapshot`. The runner hands it to the broker
after a restart; the broker matches it with the account and explains every difference by
what happened while the runner was away (a stop hit, an order that filled after its answer
was lost), or refuses to trade.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from models.trading.orders import TERMINAL, OrderState, OrderType, Side


@dataclass(frozen=True, slots=True)
class LedgerOrder:
    """An order the engine still has working (or whose fate it does not know)."""

    client_id: str
    symbol: str
    side: Side
    type: OrderType
    qty: float  # units
    intent: str  # entry, exit, flatten, sl, tp
    state: OrderState
    filled_qty: float = 0.0  # units the engine has booked
    price: float | None = None  # the limit or stop level
    parent_id: str | None = None  # a protective child's entry
    reduce_only: bool = False
    stop_loss: float | None = None
    take_profit: float | None = None


@dataclass(frozen=True, slots=True)
class Ledger:
    """Net units per symbol and the unfinished orders, as the engine's last saved state has them."""

    positions: Mapping[str, float] = field(default_factory=dict)  # symbol -> signed units
    orders: tuple[LedgerOrder, ...] = ()
    symbols: tuple[str, ...] = ()  # every symbol the engine trades (flat ones included)
    known: frozenset[str] = frozenset()  # every client id the engine has, finished ones included
    as_of_ms: int = 0  # orders placed before this (UTC ms) are history the engine has booked or forgotten


    @classmethod
    def from_snapshot(cls, snapshot: Mapping) -> Ledger:
        """From :meth:`models.trading.engine.TradingEngine.snapshot` (the plain JSON state).
        ``as_of_ms`` is the open of the last bar it processed: every order it sent before that
        bar's close is in it."""
        positions = {s: float(units) for s, (units, _avg) in snapshot["portfolio"]["positions"].items() if units}
        orders = tuple(
            LedgerOrder(d["client_id"], d["symbol"], Side(d["side"]), OrderType(d["type"]), float(d["qty"]), d["intent"],
                        OrderState(d["state"]), float(d["filled_qty"]), d["price"], d["parent_id"], bool(d["reduce_only"]),
                        d["stop_loss"], d["take_profit"])
            for d in snapshot["orders"] if OrderState(d["state"]) not in TERMINAL
        )
        last = [d["last_ts"] for d in snapshot.get("symbols", {}).values() if d.get("last_ts", -1) >= 0]
        return cls(positions, orders, tuple(snapshot.get("symbols", {})),
                   frozenset(d["client_id"] for d in snapshot["orders"]), max(last, default=0))

    def order(self, client_id: str) -> LedgerOrder | None:
        return next((o for o in self.orders if o.client_id == client_id), None)
