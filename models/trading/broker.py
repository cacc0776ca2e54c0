"""The broker port: what the engine needs from any broker, simulated, paper or MetaTrader 5.

The engine sends orders and reads back what happened as events; it never assumes an answer.
A submit may be answered at once (accepted or rejected), later (``PENDING``: the answer comes
as an event from :meth:`BrokerPort.advance`), or not at all (:class:`BrokerTimeout`: the
order becomes ``UNKNOWN`` until :meth:`BrokerPort.order_status` settles it). Submitting is
idempotent by client id: a broker that already knows an id reports that order and places
nothing, which is what makes a replayed decision safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

from models.trading.orders import Order, OrderEvent, OrderState, Side


class BrokerTimeout(TimeoutError):
    """The broker did not answer in time: the order's fate is unknown, not failed."""


class AckStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    PENDING = "pending"  # the answer will come later, as an event


# Module globals for the order path (see models/trading/orders.py: enum reads are slow in 3.11).
ACK_ACCEPTED, ACK_REJECTED, ACK_PENDING = AckStatus.ACCEPTED, AckStatus.REJECTED, AckStatus.PENDING


@dataclass(frozen=True, slots=True)  # an answer, never changed: the plain acceptance is one shared object
class SubmitAck:
    status: AckStatus
    reason: str = ""


ACCEPTED = SubmitAck(ACK_ACCEPTED)


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class Fill:
    """An execution, as a broker reports it. Prices in the quote currency, commission in the
    account currency; ``conv`` is the quote -> account rate applied to it."""

    fill_id: str
    client_id: str
    symbol: str
    side: Side
    qty: float  # units
    price: float
    commission: float
    ts: int  # ms
    conv: float
    mid: float  # the mid price at the fill, so spread and slippage costs can be told apart
    reason: str  # market, stop, limit, gap

    def to_dict(self) -> dict:
        return {"fill_id": self.fill_id, "client_id": self.client_id, "symbol": self.symbol, "side": int(self.side),
                "qty": self.qty, "price": self.price, "commission": self.commission, "ts": self.ts, "conv": self.conv,
                "mid": self.mid, "reason": self.reason}


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class BrokerEvent:
    kind: OrderEvent  # ACCEPT, REJECT, FILL, CANCEL, CANCEL_REJECT, EXPIRE
    client_id: str
    ts: int
    reason: str = ""
    fill: Fill | None = None


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class OrderStatus:
    """A broker's answer to "what became of this order?"."""

    client_id: str
    state: OrderState
    filled_qty: float = 0.0
    avg_price: float = 0.0
    reason: str = ""


class BrokerPort(ABC):
    """Implemented by the backtest's SimulatedBroker, the paper broker and the MT5 broker."""

    #: True when the broker's state changes only inside :meth:`advance`, by the bar it is
    #: given (a simulation): the engine may then skip bars on which no order can trigger.
    #: A live broker leaves it False and is asked on every bar.
    bar_driven: bool = False

    @abstractmethod
    def submit(self, order: Order) -> SubmitAck:
        """Place ``order`` (idempotent by ``order.client_id``). May raise :class:`BrokerTimeout`."""

    @abstractmethod
    def cancel(self, client_id: str) -> SubmitAck:
        """Ask to cancel; the outcome arrives as an event. May raise :class:`BrokerTimeout`."""

    @abstractmethod
    def advance(self, symbol: str, ts: int, open_: float, high: float, low: float, close: float,
                half_spread: float, conv_known: float) -> list[BrokerEvent]:
        """The market moved through this bar of ``symbol``: return what happened since the last
        call (acknowledgements, fills, cancellations), in order. ``conv_known`` is the quote ->
        account rate known at the bar's open (for commissions of cross pairs)."""

    @abstractmethod
    def order_status(self, client_id: str) -> OrderStatus | None:
        """The broker's view of one order, or None when it never received it."""

    @abstractmethod
    def positions(self) -> dict[str, float]:
        """Net units per symbol, for reconciliation."""
