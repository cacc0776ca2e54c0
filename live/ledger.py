"""What the runner tells the world, as JetStream messages with deterministic ``Nats-Msg-Id``.

Around every call into the engine (a bar, a kill command, the restart's reconciliation) the
runner opens a :class:`Window` and, after it, turns what changed into messages: each order
transition (``orders.{status}.{SYM}``, id ``ord:{runner}:{client_id}:{n}``, n the transition's
place in the order's history), each fill (``broker.fill.{SYM}``, ``fill:{runner}:{fill_id}``),
each risk decision (entries and exits on ``signals.approved|rejected.{SYM}``, what the broker
refused or left unanswered on ``broker.error.{SYM}``, the rest on ``risk.alert.{kind}``;
``risk:{runner}:{window}:{i}``). Per bar also the model's signal
(``signals.{SYM}``, ``sig:{runner}:{SYM}:{ts}``) and the account (``portfolio.{runner}``,
``pf:{runner}:{bar_seq}``). A bar done again after a crash makes the same messages with the
same ids: JetStream stores them once within its duplicate window, and the data bridge keys
every row, so nothing is counted twice after it either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.trading.engine import TradingEngine
from models.trading.orders import Order
from resources.bus import subjects


@dataclass(slots=True)
class Message:
    subject: str
    data: dict[str, Any]
    msg_id: str


class Window:
    """The engine's records before a call, to find what the call changed."""

    __slots__ = ("fills", "events", "history", "known")

    def __init__(self, engine: TradingEngine) -> None:
        self.fills = len(engine.fills)
        self.events = len(engine.risk_events)
        self.history = {cid: len(o.history) for cid, o in engine.orders.items() if not o.is_terminal}
        self.known = len(engine.orders)

    def transitions(self, engine: TradingEngine) -> list[tuple[Order, int]]:
        """(order, index of its first new history entry) for every order that moved."""
        out = []
        for cid, n in self.history.items():
            order = engine.orders.get(cid)
            if order is not None and len(order.history) > n:
                out.append((order, n))
        if len(engine.orders) > self.known:
            out.extend((order, 0) for order in list(engine.orders.values())[self.known:])
        return out


@dataclass
class LedgerWriter:
    """Builds the messages of a runner (see the module doc)."""

    runner: str
    timeframe: str
    counts: dict[str, int] = field(default_factory=dict)  # order transitions by status, for metrics

    def changes(self, engine: TradingEngine, window: Window, tag: str, ts: int, model_version: str) -> list[Message]:
        out: list[Message] = []
        self.counts = {}
        for order, start in window.transitions(engine):
            for k in range(start, len(order.history)):
                event, state = order.history[k]
                status = state.value
                self.counts[status] = self.counts.get(status, 0) + 1
                out.append(Message(subjects.orders(status, order.symbol), {
                    "runner": self.runner, "client_id": order.client_id, "seq": k, "event": event.value, "status": status,
                    "symbol": order.symbol, "side": int(order.side), "type": order.type.value, "qty": order.qty,
                    "intent": order.intent, "bar_ts": order.bar_ts, "price": order.price, "stop_loss": order.stop_loss,
                    "take_profit": order.take_profit, "filled_qty": order.filled_qty,
                    "avg_fill_price": order.avg_fill_price, "parent_id": order.parent_id, "reason": order.reason,
                    "model_version": model_version, "ts": ts,
                }, f"ord:{self.runner}:{order.client_id}:{k}"))
        for fill in engine.fills[window.fills:]:
            out.append(Message(subjects.broker_fill(fill.symbol), {"runner": self.runner, **fill.to_dict()},
                               f"fill:{self.runner}:{fill.fill_id}"))
        for i, event in enumerate(engine.risk_events[window.events:]):
            data = {"runner": self.runner, "event_id": f"risk:{self.runner}:{tag}:{i}", "ts": event.ts, "symbol": event.symbol,
                    "kind": event.kind, "approved": event.approved, "reason": event.reason, "client_id": event.client_id,
                    "qty": event.qty, "source": "engine", "model_version": model_version}
            if event.kind in ("entry", "exit") and event.symbol:
                subject = subjects.signal_decision(event.approved, event.symbol)
            elif event.kind == "broker" and not event.approved and event.symbol:
                subject = subjects.broker_error(event.symbol)  # a rejection, a timeout, an order never placed
            else:
                subject = subjects.risk_alert(event.kind)
            out.append(Message(subject, data, data["event_id"]))
        return out

    def alert(self, kind: str, event_id: str, ts: int, symbol: str, reason: str, **extra: Any) -> Message:
        """A runner's own alert (a bad bar, a failed reconciliation, a model swap or refusal)."""
        data = {"runner": self.runner, "event_id": f"{kind}:{self.runner}:{event_id}", "ts": ts, "symbol": symbol,
                "kind": kind, "approved": False, "reason": reason, "client_id": "", "qty": 0.0, "source": "runner", **extra}
        return Message(subjects.risk_alert(kind), data, data["event_id"])

    def signal(self, symbol: str, ts: int, close_ts: int, model: Any, value: float | None, signal: dict | None,
               status: str, reason: str, feature_set: str) -> Message:
        data = {"runner": self.runner, "symbol": symbol, "timeframe": self.timeframe, "ts": ts, "close_ts": close_ts,
                "model_name": model.name if model else "", "model_version": model.version if model else "",
                "feature_set": feature_set, "value": value, "column": model.column if model else "",
                "side": None if not signal else signal.get("side"), "confidence": None if not signal else signal.get("confidence"),
                "prob": None if not signal else signal.get("prob"), "status": status, "reason": reason}
        return Message(subjects.signals(symbol), data, f"sig:{self.runner}:{symbol}:{ts}")

    def portfolio(self, engine: TradingEngine, bar_seq: int, ts: int, symbol: str, marks: dict[str, float], peak: float,
                  model_version: str) -> Message:
        equity = engine.equity()
        exposure, margin = engine.exposure()
        positions = {s: {"units": p.units, "avg": p.avg, "mark": marks.get(s)} for s, p in engine.portfolio.positions.items()
                     if p.units}
        data = {"runner": self.runner, "bar_seq": bar_seq, "ts": ts, "symbol": symbol, "equity": equity,
                "balance": engine.portfolio.balance, "margin": margin, "exposure": exposure, "positions": positions, "peak": peak,
                "drawdown": 0.0 if peak <= 0 else max(0.0, 1.0 - equity / peak), "kill": engine.kill.value,
                "kill_reason": engine.kill_reason, "model_version": model_version}
        return Message(subjects.portfolio(self.runner), data, f"pf:{self.runner}:{bar_seq}")
