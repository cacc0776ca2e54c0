"""The user's broker data from the bus into the warehouse (the data-bridge for ``BROKER_DATA``).

The MT5 side publishes account snapshots, quotes and deals to the JetStream stream
``BROKER_DATA`` (:mod:`live.broker_data`). Every minute this sensor drains it through the
durable pull consumer ``warehouse-broker-data`` into ``broker_account``, ``broker_quotes`` and
``broker_trades``: a batch is written, then acknowledged. A crash between the two redelivers the
batch and the rows replace themselves (ReplacingMergeTree on each table's key, read with FINAL),
so the drain is idempotent. A message that is not a row of its table is refused with its reason
(logged with its stream sequence, terminated so it is not redelivered; the stream keeps it for
its retention). Without ``NATS_URL`` and with no embedded nats-server running there is nothing
to drain, and the sensor says so instead of starting one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from resources.bus.client import NatsBus, StreamSpec
from resources.bus.drain import DrainStats, StoreBatch, drain_stream, durable_consumer
from resources.bus.messages import BadMessage, broker_frame, decode_broker_row
from resources.bus.resource import BusResource
from resources.bus.streams import broker_data_stream
from resources.warehouse.broker import write_account, write_quotes, write_trades
from resources.warehouse.client import Warehouse, WarehouseResource

CONSUMER = "warehouse-broker-data"
_DESCRIPTION = "the drain_broker_data sensor: BROKER_DATA -> broker_* tables"
_WRITERS = {"account": write_account, "quote": write_quotes, "deal": write_trades}


@dataclass
class DrainResult(DrainStats):
    stored: dict[str, int] = field(default_factory=lambda: {"account": 0, "quote": 0, "deal": 0})

    def describe(self) -> str:
        s = self.stored
        text = (f"{self.messages:,} messages: {s['account']:,} account snapshots, {s['quote']:,} quotes, "
                f"{s['deal']:,} deals stored")
        if self.refused:
            seq, subject, reason = self.refused[0]
            text += f"; {len(self.refused)} refused (first: #{seq} on {subject}: {reason})"
        return text


def _kind(subject: str) -> str:
    parts = subject.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "broker" else ""


async def _consumer(bus: NatsBus, stream: StreamSpec, ack_wait_s: float) -> Any:
    return await durable_consumer(bus, stream, CONSUMER, ack_wait_s=ack_wait_s, description=_DESCRIPTION)


def _storer(warehouse: Warehouse, result: DrainResult) -> StoreBatch:
    def store(messages: list[Any]) -> list[tuple[Any, str]]:
        """Write the rows of a batch; the messages that are not rows of their table are refused."""
        rows: dict[str, list[dict]] = {kind: [] for kind in _WRITERS}
        refused = []
        for message in messages:
            kind = _kind(message.subject)
            try:
                if kind not in _WRITERS:
                    raise BadMessage("malformed", f"no broker data kind on subject {message.subject}")
                rows[kind].append(decode_broker_row(kind, message.data))
            except BadMessage as exc:
                refused.append((message, str(exc)))
        for kind, writer in _WRITERS.items():
            if rows[kind]:
                result.stored[kind] += writer(warehouse, broker_frame(kind, rows[kind]))
        return refused

    return store


async def drain(bus: NatsBus, warehouse: Warehouse, *, stream: StreamSpec | None = None, batch: int = 1000,
                max_messages: int = 200_000, budget_s: float = 40.0, ack_wait_s: float = 120.0) -> DrainResult:
    """Write what ``BROKER_DATA`` holds beyond the consumer's acknowledged position, batch by
    batch, each acknowledged after its rows are written (:func:`resources.bus.drain.drain_stream`)."""
    result = DrainResult()
    await bus.connect()
    try:
        await drain_stream(bus, stream or broker_data_stream(), CONSUMER, _storer(warehouse, result),
                           description=_DESCRIPTION, batch=batch, max_messages=max_messages,
                           deadline=time.monotonic() + budget_s, ack_wait_s=ack_wait_s, stats=result)
    finally:
        await bus.close()  # drains the connection: the acknowledgements are sent before it closes
    return result


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drain the MT5 broker data (account snapshots, quotes, deals) from the NATS stream BROKER_DATA "
                    "into broker_account, broker_quotes and broker_trades, idempotently.")
def drain_broker_data(context: SensorEvaluationContext, bus: BusResource, warehouse: WarehouseResource) -> SkipReason:
    result = bus.drain(lambda client: drain(client, warehouse))
    if isinstance(result, str):
        return SkipReason(result)
    for seq, subject, reason in result.refused:
        context.log.warning(f"BROKER_DATA #{seq} on {subject} refused: {reason}")
    if result.messages:
        context.log.info(result.describe())
    return SkipReason(result.describe() if result.messages else "BROKER_DATA: nothing new")
