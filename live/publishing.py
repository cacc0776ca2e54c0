"""JetStream publishing that outlives a bus outage, for the collector, the replay and the
broker-data publisher.

A message is published with its deterministic ``Nats-Msg-Id`` and retried, with the same id,
until JetStream acknowledges it: a retry of a message that was in fact stored (its answer lost
in the outage) is recognised by the stream's duplicate window and stored once. Callers publish
one message of a subject at a time and wait for its acknowledgement before the next, so a
subject's messages are stored in order even across reconnects (a pipelined later message must
never overtake an earlier one that is still being retried). The client's own reconnects are
bounded (``NatsBus``); when it gives up, this reconnects from scratch, for as long as it takes
(or ``give_up_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from resources.bus.client import BusError, NatsBus, StreamSpec

log = logging.getLogger("tradeforge.live")


class DurablePublisher:
    """Publishes to one stream through ``bus`` (its own connection, made by :meth:`start`)."""

    def __init__(self, bus: NatsBus, stream: StreamSpec, *, retry_s: float = 0.2, max_retry_s: float = 5.0,
                 timeout_s: float = 2.0, give_up_s: float | None = None) -> None:
        self.bus = bus
        self.stream = stream
        self.retry_s, self.max_retry_s, self.timeout_s, self.give_up_s = retry_s, max_retry_s, timeout_s, give_up_s
        self.stored = 0
        self.duplicates = 0
        self.retries = 0
        self.outages = 0

    async def start(self) -> None:
        await self.bus.connect()
        await self.bus.ensure_stream(self.stream)

    async def _reconnect(self) -> None:
        await self.bus.close()
        await self.bus.connect()
        self.bus._streams.discard(self.stream.name)  # the server may be a fresh one: check the stream again
        await self.bus.ensure_stream(self.stream)

    async def publish(self, subject: str, data: Any, msg_id: str) -> bool:
        """Store ``data`` on ``subject``; True when stored now, False when the stream already had
        ``msg_id``. Waits out outages; raises :class:`BusError` only after ``give_up_s``."""
        delay, started, failing = self.retry_s, time.monotonic(), None
        while True:
            try:
                if not self.bus.connected:
                    await self._reconnect()
                stored = await self.bus.publish_durable(subject, data, msg_id, self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # nats raises timeouts, no-responders, closed connections, OSError
                reason = f"{type(exc).__name__}: {exc}".strip(": ")
                if failing is None:
                    self.outages += 1
                    log.warning("bus: publishing %s failed (%s); retrying until it is stored", subject, reason)
                failing = reason
                self.retries += 1
                if self.give_up_s is not None and time.monotonic() - started > self.give_up_s:
                    raise BusError(f"{self.bus.describe()}: {subject} not stored after {self.give_up_s:.0f}s ({reason})") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_s)
                continue
            if failing is not None:
                log.warning("bus: %s stored after %.1fs of failures", subject, time.monotonic() - started)
            if stored:
                self.stored += 1
            else:
                self.duplicates += 1
            return stored

    async def close(self) -> None:
        await self.bus.close()
