"""The live runners' ledgers from the bus into the warehouse (the seeds' data-bridge).

A runner publishes what it decided and did to the JetStream streams ``SIGNALS``, ``ORDERS``,
``BROKER`` (fills, errors), ``RISK`` and ``PORTFOLIO`` (:mod:`live.ledger`,
:func:`resources.bus.streams.ledger_streams`) and never opens the warehouse while it trades.
Every minute this sensor drains each stream through its durable pull consumer
``warehouse-ledger`` into ``trading_signals``, ``orders``, ``executions``, ``positions``,
``portfolio_value`` and ``risk_events`` (:mod:`resources.warehouse.ledger`): a batch is written,
then acknowledged (:func:`resources.bus.drain.drain_stream`). Rows are keyed by their message's
identity, so a redelivery (a crash between write and ack, a consumer lost) replaces them. A
message that is not a ledger row is refused with its reason (logged with its stream and
sequence, terminated; the stream keeps it for its retention). No bus: the sensor says so and
starts none.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from resources.bus.client import NatsBus, StreamSpec
from resources.bus.drain import DrainStats, StoreBatch, drain_stream
from resources.bus.messages import BadMessage
from resources.bus.resource import BusResource
from resources.bus.streams import ledger_streams
from resources.warehouse.client import Warehouse, WarehouseConnection, WarehouseResource
from resources.warehouse.ledger import LEDGER_TABLES, ledger_frame, ledger_rows, write_ledger

CONSUMER = "warehouse-ledger"


@dataclass
class LedgerDrain:
    """What a drain did, per stream (messages, refusals) and per table (rows written)."""

    streams: dict[str, DrainStats] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEDGER_TABLES, 0))

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.streams.values())

    @property
    def refused(self) -> list[tuple[str, int, str, str]]:
        """(stream, sequence, subject, reason) of every message refused."""
        return [(name, *r) for name, s in self.streams.items() for r in s.refused]

    def describe(self) -> str:
        if not self.messages:
            return "ledger: nothing new"
        rows = ", ".join(f"{n:,} {table}" for table, n in self.stored.items() if n) or "no rows"
        text = f"{self.messages:,} ledger messages: {rows} stored"
        if self.refused:
            stream, seq, subject, reason = self.refused[0]
            text += f"; {len(self.refused)} refused (first: {stream} #{seq} on {subject}: {reason})"
        return text


def _session(warehouse: Warehouse) -> contextlib.AbstractContextManager:
    return warehouse.session() if isinstance(warehouse, WarehouseConnection) else contextlib.nullcontext(warehouse)


def _storer(warehouse: Warehouse, result: LedgerDrain) -> StoreBatch:
    def store(messages: list) -> list[tuple[object, str]]:
        rows: dict[str, list[dict]] = {table: [] for table in LEDGER_TABLES}
        refused = []
        for message in messages:
            try:
                for table, table_rows in ledger_rows(message.subject, message.data).items():
                    rows[table] += table_rows
            except BadMessage as exc:
                refused.append((message, str(exc)))
        written = [(table, table_rows) for table, table_rows in rows.items() if table_rows]
        if written:
            with _session(warehouse) as session:  # one connection for the batch's tables
                for table, table_rows in written:
                    result.stored[table] += write_ledger(session, table, ledger_frame(table, table_rows))
        return refused

    return store


async def drain(bus: NatsBus, warehouse: Warehouse, *, streams: tuple[StreamSpec, ...] | None = None, batch: int = 1000,
                max_messages: int = 200_000, budget_s: float = 40.0, ack_wait_s: float = 120.0) -> LedgerDrain:
    """Write what each ledger stream holds beyond its consumer's acknowledged position."""
    result = LedgerDrain()
    store = _storer(warehouse, result)
    deadline = time.monotonic() + budget_s
    await bus.connect()
    try:
        for stream in streams or ledger_streams():
            result.streams[stream.name] = await drain_stream(
                bus, stream, CONSUMER, store, description=f"the drain_ledger sensor: {stream.name} -> the ledger tables",
                batch=batch, max_messages=max_messages, deadline=deadline, ack_wait_s=ack_wait_s)
    finally:
        await bus.close()  # drains the connection: the acknowledgements are sent before it closes
    return result


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drain the live runners' ledgers from the NATS streams SIGNALS, ORDERS, BROKER, RISK and PORTFOLIO "
                    "into trading_signals, orders, executions, positions, portfolio_value and risk_events, idempotently.")
def drain_ledger(context: SensorEvaluationContext, bus: BusResource, warehouse: WarehouseResource) -> SkipReason:
    result = bus.drain(lambda client: drain(client, warehouse))
    if isinstance(result, str):
        return SkipReason(result)
    for stream, seq, subject, reason in result.refused:
        context.log.warning(f"{stream} #{seq} on {subject} refused: {reason}")
    if result.messages:
        context.log.info(result.describe())
    return SkipReason(result.describe())
