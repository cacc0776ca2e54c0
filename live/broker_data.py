"""The user's broker data over the bus: the MT5 terminal's account snapshots, quotes and deals,
sampled next to the terminal (the Windows machine) and published to the JetStream stream
``BROKER_DATA``; the ``drain_broker_data`` sensor stores them in the warehouse wherever it is.

One message per row (:func:`resources.bus.messages.encode_broker_row`) on
``broker.account.{login}``, ``broker.quote.{SYM}``, ``broker.deal.{SYM}``, with the row's table
key as its ``Nats-Msg-Id``: the deals the sampler reads again (its windows overlap by an hour)
are stored once, and a row the stream did take twice (after its duplicate window) replaces
itself in the ReplacingMergeTree tables. Each message is acknowledged before the next
(:class:`live.publishing.DurablePublisher`), so a bus outage delays rows and loses none; a
terminal that does not answer costs that sample, not the publisher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from live.publishing import DurablePublisher
from resources.brokers.mt5.sampler import BrokerDataSampler, SamplerError
from resources.bus.client import NatsBus, StreamSpec
from resources.bus.messages import broker_msg_id, encode_broker_row
from resources.bus.streams import broker_data_stream
from resources.bus.subjects import broker_account, broker_deal, broker_quote

log = logging.getLogger("tradeforge.live")


@dataclass
class BrokerDataStats:
    published: dict[str, int] = field(default_factory=lambda: {"account": 0, "quote": 0, "deal": 0})
    already_stored: int = 0
    samples: int = 0
    failed_samples: int = 0


class BrokerDataPublisher:
    def __init__(self, bus: NatsBus, sampler: BrokerDataSampler, *, stream: StreamSpec | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.sampler = sampler
        self.publisher = DurablePublisher(bus, stream or broker_data_stream())
        self.progress = progress or (lambda line: log.info("%s", line))
        self.stats = BrokerDataStats()
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self.publisher.start()

    async def _publish(self, kind: str, frame: pl.DataFrame, subject: Callable[[dict], str]) -> int:
        stored = 0
        for row in frame.iter_rows(named=True):
            if await self.publisher.publish(subject(row), encode_broker_row(row), broker_msg_id(kind, row)):
                stored += 1
            else:
                self.stats.already_stored += 1
        self.stats.published[kind] += stored
        return stored

    async def publish_sample(self, since_ms: int | None = None, deals: bool = True) -> dict[str, int]:
        """Sample the terminal once and publish what it gave: rows stored now, per kind."""
        account, quotes = self.sampler.account(), self.sampler.quotes()
        trades = self.sampler.deals(since_ms) if deals else None
        out = {"account": await self._publish("account", account, lambda r: broker_account(r["login"])),
               "quote": await self._publish("quote", quotes, lambda r: broker_quote(r["symbol"]))}
        if trades is not None:
            out["deal"] = await self._publish("deal", trades, lambda r: broker_deal(r["symbol"]))
        self.stats.samples += 1
        return out

    async def run(self, interval_s: float = 1.0, deals_every: int = 10, since_ms: int | None = None) -> BrokerDataStats:
        """Sample every ``interval_s`` (deals every ``deals_every`` samples, the first from
        ``since_ms``) until :meth:`stop`."""
        await self.start()
        n = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self.publish_sample(since_ms if n == 0 else None, deals=n % deals_every == 0)
                except SamplerError as exc:  # the terminal is reconnecting: this sample is lost, not the next
                    self.stats.failed_samples += 1
                    self.progress(f"broker data: {exc}; trying again in {interval_s:g}s")
                n += 1
                try:
                    await asyncio.wait_for(self._stopping.wait(), interval_s)
                except TimeoutError:
                    pass
        finally:
            await self.publisher.close()
        return self.stats

    def stop(self) -> None:
        self._stopping.set()
