"""Draining a JetStream stream into storage, at least once and idempotently (the data-bridge).

A durable pull consumer per stream remembers what was stored. Each batch is fetched, handed to
``store`` (which writes the rows it can read and names the messages it refuses, with a
reason), and only then acknowledged: a crash between the write and the acknowledgement
delivers the batch again, so the storage must be keyed (the warehouse's ReplacingMergeTree
tables are). A refused message is terminated, not redelivered; the stream keeps it for its
retention, and the caller logs its sequence and reason.

Used by the Dagster sensors that drain ``BROKER_DATA`` (:mod:`sensors.broker_data`) and the live
runner's ledger (:mod:`sensors.ledger`). Nothing here imports Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resources.bus.client import NatsBus, StreamSpec

#: Reads a batch, writes what it can, returns the messages it refuses with their reasons.
StoreBatch = Callable[[list[Any]], list[tuple[Any, str]]]


@dataclass
class DrainStats:
    messages: int = 0
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (stream sequence, subject, reason)


async def durable_consumer(bus: NatsBus, stream: StreamSpec, name: str, *, ack_wait_s: float, description: str) -> Any:
    """The pull subscription of the durable consumer ``name`` on ``stream`` (both created when
    missing: a new consumer starts at the stream's first message)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    await bus.ensure_stream(stream)
    try:
        await bus.js.consumer_info(stream.name, name)
    except NotFoundError:
        await bus.js.add_consumer(stream.name, ConsumerConfig(
            durable_name=name, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait_s,
            max_ack_pending=-1, description=description,
        ))
    return await bus.js.pull_subscribe_bind(durable=name, stream=stream.name)


async def _store(messages: list[Any], store: StoreBatch, stats: DrainStats) -> None:
    refused = store(messages)
    bad = {id(message) for message, _ in refused}
    for message in messages:  # only now: a crash before this line redelivers, and the rows replace themselves
        if id(message) not in bad:
            await message.ack()
    for message, reason in refused:
        stats.refused.append((message.metadata.sequence.stream, message.subject, reason))
        await message.term()
    stats.messages += len(messages)


async def drain_stream(bus: NatsBus, stream: StreamSpec, consumer: str, store: StoreBatch, *, description: str,
                       batch: int = 1000, max_messages: int = 200_000, deadline: float | None = None,
                       ack_wait_s: float = 120.0, stats: DrainStats | None = None) -> DrainStats:
    """Store what ``stream`` holds beyond the consumer's acknowledged position, batch by batch,
    until it is drained, ``max_messages`` were read or ``time.monotonic()`` passes ``deadline``.
    ``bus`` is connected; the caller closes it (closing drains the connection, which sends the
    acknowledgements)."""
    stats = stats or DrainStats()
    start = stats.messages

    def more() -> bool:
        return stats.messages - start < max_messages and (deadline is None or time.monotonic() < deadline)

    subscription = await durable_consumer(bus, stream, consumer, ack_wait_s=ack_wait_s, description=description)
    try:
        info = await bus.js.consumer_info(stream.name, consumer)
        waiting = info.num_pending  # not delivered yet; what is published meanwhile waits for the next tick
        while waiting > 0 and more():
            try:
                messages = await subscription.fetch(min(batch, waiting), timeout=5.0)
            except TimeoutError:  # nats' and asyncio's
                break
            waiting -= len(messages)
            await _store(messages, store, stats)
        if info.num_ack_pending:  # delivered before and never acknowledged: back once their ack_wait is over
            while more():
                try:
                    messages = await subscription.fetch(batch, timeout=0.25)
                except TimeoutError:
                    break
                await _store(messages, store, stats)
    finally:
        await subscription.unsubscribe()  # a pull subscription left open makes the connection's drain wait 30 s
    return stats
