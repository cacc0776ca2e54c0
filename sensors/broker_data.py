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

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from resources.bus.client import BusError, NatsBus, StreamSpec
from resources.bus.messages import BadMessage, broker_frame, decode_broker_row
from resources.bus.resource import BusResource
from resources.bus.streams import broker_data_stream
from resources.warehouse.broker import write_account, write_quotes, write_trades
from resources.warehouse.client import Warehouse, WarehouseResource

CONSUMER = "warehouse-broker-data"
_WRITERS = {"account": write_account, "quote": write_quotes, "deal": write_trades}


@dataclass
class DrainResult:
    stored: dict[str, int] = field(default_factory=lambda: {"account": 0, "quote": 0, "deal": 0})
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (stream sequence, subject, reason)
    messages: int = 0

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
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    await bus.ensure_stream(stream)
    try:
        await bus.js.consumer_info(stream.name, CONSUMER)
    except NotFoundError:
        await bus.js.add_consumer(stream.name, ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait_s,
            max_ack_pending=-1, description="the drain_broker_data sensor: BROKER_DATA -> broker_* tables",
        ))
    return await bus.js.pull_subscribe_bind(durable=CONSUMER, stream=stream.name)


async def _store(messages: list[Any], warehouse: Warehouse, result: DrainResult) -> None:
    """Write a batch, then acknowledge it (refused messages are terminated, not redelivered)."""
    rows: dict[str, list[dict]] = {kind: [] for kind in _WRITERS}
    good, bad = [], []
    for message in messages:
        kind = _kind(message.subject)
        try:
            if kind not in _WRITERS:
                raise BadMessage("malformed", f"no broker data kind on subject {message.subject}")
            rows[kind].append(decode_broker_row(kind, message.data))
            good.append(message)
        except BadMessage as exc:
            bad.append(message)
            result.refused.append((message.metadata.sequence.stream, message.subject, str(exc)))
    for kind, writer in _WRITERS.items():
        if rows[kind]:
            result.stored[kind] += writer(warehouse, broker_frame(kind, rows[kind]))
    for message in good:  # only now: a crash before this line redelivers, and the rows replace themselves
        await message.ack()
    for message in bad:
        await message.term()
    result.messages += len(messages)


async def drain(bus: NatsBus, warehouse: Warehouse, *, stream: StreamSpec | None = None, batch: int = 1000,
                max_messages: int = 200_000, budget_s: float = 40.0, ack_wait_s: float = 120.0) -> DrainResult:
    """Write what ``BROKER_DATA`` holds beyond the consumer's acknowledged position, batch by
    batch, each acknowledged after its rows are written."""
    stream = stream or broker_data_stream()
    result = DrainResult()
    started = time.monotonic()

    def more() -> bool:
        return result.messages < max_messages and time.monotonic() - started < budget_s

    await bus.connect()
    subscription = None
    try:
        subscription = await _consumer(bus, stream, ack_wait_s)
        info = await bus.js.consumer_info(stream.name, CONSUMER)
        waiting = info.num_pending  # not delivered yet; what is published meanwhile waits for the next tick
        while waiting > 0 and more():
            try:
                messages = await subscription.fetch(min(batch, waiting), timeout=5.0)
            except TimeoutError:  # nats' and asyncio's
                break
            waiting -= len(messages)
            await _store(messages, warehouse, result)
        if info.num_ack_pending:  # delivered before and never acknowledged: back once their ack_wait is over
            while more():
                try:
                    messages = await subscription.fetch(batch, timeout=0.25)
                except TimeoutError:
                    break
                await _store(messages, warehouse, result)
    finally:
        if subscription is not None:
            await subscription.unsubscribe()  # a pull subscription left open makes the drain below wait 30 s
        await bus.close()  # drains the connection: the acknowledgements are sent before it closes
    return result


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Drain the MT5 broker data (account snapshots, quotes, deals) from the NATS stream BROKER_DATA "
                    "into broker_account, broker_quotes and broker_trades, idempotently.")
def drain_broker_data(context: SensorEvaluationContext, bus: BusResource, warehouse: WarehouseResource) -> SkipReason:
    client = bus.get_client()
    if client.embedded is not None and not client.embedded.running():
        return SkipReason(f"no bus to drain: NATS_URL is unset and the embedded nats-server on {client.embedded.url} "
                          "is not running")
    try:
        result = asyncio.run(drain(client, warehouse))
    except BusError as exc:
        return SkipReason(f"bus unreachable: {exc}")
    for seq, subject, reason in result.refused:
        context.log.warning(f"BROKER_DATA #{seq} on {subject} refused: {reason}")
    if result.messages:
        context.log.info(result.describe())
    return SkipReason(result.describe() if result.messages else "BROKER_DATA: nothing new")
