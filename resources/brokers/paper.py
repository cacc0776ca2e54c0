"""The paper broker: the backtest's fill model at the live bid/ask, as an account the runner keeps.

It is :class:`~models.trading.fills.SimulatedBroker`, the class the backtests use (a market
order fills at the next bar's open plus half that bar's own spread and the slippage; stops and
targets trigger on the bid/ask inside the bar, the stop first; commission per side), so a day
traded on paper is that day's backtest, order for order. What it adds is what a broker behind
the live runner needs:

- its account saved and restored (:meth:`PaperBroker.state` / :meth:`PaperBroker.load`): the
  runner writes it in the same NATS KV value as the engine's snapshot, so after a crash the
  two can never disagree;
- reconciliation against the engine's ledger at start (:meth:`PaperBroker.reconcile`), with
  the MT5 broker's report shape, so the runner's restart sequence is one for both;
- bounded history: finished orders older than a cut-off are forgotten (:meth:`PaperBroker.compact`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.trading.fills import SimulatedBroker
from models.trading.ledger import Ledger
from models.trading.orders import OrderState

_FINISHED = (OrderState.FILLED, OrderState.CANCELLED, OrderState.REJECTED, OrderState.EXPIRED)


@dataclass
class PaperReconcileReport:
    """What reconciliation found (the fields the runner reads from the MT5 broker's report too)."""

    ok: bool
    positions: dict[str, float]
    expected: dict[str, float]
    mismatches: list[str] = field(default_factory=list)
    unclaimed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"trading halted: {len(self.mismatches)} unexplained difference(s) with the paper account: " + \
                "; ".join(self.mismatches)
        return f"reconciled: {len(self.positions)} position(s) in the paper account, as the ledger has them"


class PaperBroker(SimulatedBroker):
    """See the module doc. Netting, like the backtest's broker."""

    name = "paper"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.halted: str | None = None

    # -- the live broker's life cycle (the MT5 broker has the same methods) --------------------
    def connect(self) -> None:
        """Nothing to connect to: the account lives in the runner's saved state."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def reconcile(self, ledger: Ledger) -> PaperReconcileReport:
        """The account against the engine's ledger: positions must match, and every order the
        ledger has working must be working here. They are saved together, so a difference
        means the state was edited or mixed up with another runner's: trading halts."""
        mine = self.positions()
        expected = {s: u for s, u in ledger.positions.items() if abs(u) > 1e-9}
        mismatches = [f"{s}: the paper account holds {mine.get(s, 0.0):+,.0f} units, the ledger {expected.get(s, 0.0):+,.0f}"
                      for s in sorted(set(mine) | set(expected)) if abs(mine.get(s, 0.0) - expected.get(s, 0.0)) > 1e-6]
        for order in ledger.orders:
            status = self.order_status(order.client_id)
            if status is None:
                mismatches.append(f"order {order.client_id} ({order.symbol} {order.intent}) is working in the ledger but "
                                  f"unknown to the paper account")
        report = PaperReconcileReport(not mismatches, mine, expected, mismatches)
        self.halted = None if report.ok else report.summary()
        return report

    def drain_events(self, symbol: str | None = None) -> list:
        """Events that happened while the runner was away: none, the paper market moves only with bars."""
        return []

    def check_claimed(self) -> None:
        """Nothing can be unclaimed: the account and the engine are saved together."""

    # -- state --------------------------------------------------------------------------------------
    def state(self) -> dict:
        return self.snapshot()

    def load(self, state: dict) -> None:
        self.restore(state)

    def compact(self, before_ms: int) -> int:
        """Forget finished orders decided before ``before_ms`` (kept: anything working, and the
        parents of what is kept). Returns how many were forgotten."""
        keep = {w.order.client_id for lists in (self._queue, self._resting) for works in lists.values() for w in works}
        for cid, work in self._orders.items():
            if work.state not in _FINISHED or work.order.bar_ts >= before_ms:
                keep.add(cid)
        for cid in list(keep):
            parent = self._orders[cid].order.parent_id
            while parent is not None and parent not in keep:
                keep.add(parent)
                parent = self._orders[parent].order.parent_id
        dropped = len(self._orders) - len(keep)
        if dropped:
            self._orders = {cid: w for cid, w in self._orders.items() if cid in keep}
        return dropped
