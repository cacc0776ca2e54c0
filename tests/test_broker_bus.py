"""The user's broker data over the bus: the sampler's frames from the fake MT5 terminal
published to a real nats-server's BROKER_DATA stream, and the Dagster sensor draining it into
the embedded warehouse: every row once, however often it is sampled, published or delivered;
bad messages refused with a reason and never redelivered."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest
from dagster import build_sensor_context

from live.broker_data import BrokerDataPublisher
from resources.brokers.mt5 import constants as C
from resources.brokers.mt5.fake import FakeTerminal
from resources.brokers.mt5.sampler import BrokerDataSampler
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.bus.resource import BusResource
from resources.warehouse.broker import read_account, read_quotes, read_trades
from sensors.broker_data import CONSUMER, drain_broker_data
from tests.natsserver import free_port

T0 = 1_709_546_400_000  # 2024-03-04 10:00 UTC


@pytest.fixture
def nats(tmp_path) -> EmbeddedNatsServer:
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    yield server
    server.stop()


def _terminal() -> FakeTerminal:
    fake = FakeTerminal(commission_per_lot=7.0, start_ms=T0, server_utc_offset_s=7200, balance=50_000.0)
    for symbol in ("EURUSD", "XAUUSD"):
        fake.add_symbol(symbol)
    fake.initialize()
    for symbol in ("EURUSD", "XAUUSD"):
        fake.symbol_select(symbol)
    fake.set_quote("EURUSD", 1.08500, 1.08502, T0)
    fake.set_quote("XAUUSD", 2100.10, 2100.40, T0)
    return fake


def _tick(sensor_context) -> str:
    return drain_broker_data.evaluate_tick(sensor_context).skip_message


def test_samples_reach_the_tables_once_through_the_stream_and_the_sensor(nats, warehouse):
    fake = _terminal()
    frames: dict[str, list[pl.DataFrame]] = {"account": [], "quote": [], "deal": []}

    class Recording(BrokerDataSampler):  # what the publisher sampled, to compare the tables with
        def account(self):
            frames["account"].append(out := super().account())
            return out

        def quotes(self):
            frames["quote"].append(out := super().quotes())
            return out

        def deals(self, since_ms=None):
            frames["deal"].append(out := super().deals(since_ms))
            return out

    sampler = Recording(fake, ["EURUSD", "XAUUSD"], server_utc_offset_s=7200, clock=fake.utc_now)

    async def publish():
        publisher = BrokerDataPublisher(NatsBus(nats.url), sampler, progress=lambda line: None)
        await publisher.start()
        fake.place_manual("EURUSD", C.ORDER_TYPE_BUY, 0.2)
        first = await publisher.publish_sample(since_ms=T0 - 3_600_000)
        fake.advance_time(60_000)
        fake.set_quote("EURUSD", 1.08510, 1.08512)
        fake.place_manual("XAUUSD", C.ORDER_TYPE_SELL, 0.1)
        second = await publisher.publish_sample(since_ms=T0 - 3_600_000)  # the first deal again: refused by its id
        await publisher.publisher.close()
        return first, second, publisher.stats

    first, second, stats = asyncio.run(publish())
    assert first == {"account": 1, "quote": 2, "deal": 1}
    assert second == {"account": 1, "quote": 1, "deal": 1}  # XAUUSD's quote did not move: not sampled again
    assert stats.already_stored == 1

    context = build_sensor_context(resources={"bus": BusResource(url=nats.url), "warehouse": warehouse})
    assert _tick(context).startswith("7 messages: 2 account snapshots, 3 quotes, 2 deals stored")
    assert _tick(context) == "BROKER_DATA: nothing new"

    def tables():
        return read_account(warehouse), read_quotes(warehouse), read_trades(warehouse)

    account, quotes, trades = tables()
    key = {"account": ["login", "ts"], "quote": ["server", "symbol", "ts"], "deal": ["ts", "deal"]}
    for kind, table in (("account", account), ("quote", quotes), ("deal", trades)):
        sampled = pl.concat(frames[kind]).unique(key[kind], keep="first", maintain_order=True).sort(key[kind])
        assert table.sort(key[kind]).equals(sampled), kind  # every column, as sampled
    assert trades["client_id"].to_list() == [None, None] and trades["side"].to_list() == [1, -1]

    async def forget_the_consumer():  # its state lost: everything is delivered again
        bus = NatsBus(nats.url)
        await bus.connect()
        await bus.js.delete_consumer("BROKER_DATA", CONSUMER)
        await bus.close()

    asyncio.run(forget_the_consumer())
    assert _tick(context).startswith("7 messages: 2 account snapshots, 3 quotes, 2 deals stored")
    again = tables()
    assert all(a.equals(b) for a, b in zip(again, (account, quotes, trades), strict=True))  # rows replaced themselves


def test_a_bad_message_is_refused_with_its_reason_and_the_rest_is_stored(nats, warehouse):
    async def publish():
        bus = NatsBus(nats.url)
        await bus.connect()
        from resources.bus.streams import broker_data_stream

        await bus.ensure_stream(broker_data_stream())
        good = {"server": "Demo-Server", "symbol": "EURUSD.m", "ts": T0, "bid": 1.085, "ask": 1.08502}
        await bus.publish_durable("broker.quote.EURUSD_m", good, msg_id="q1")
        await bus.publish_durable("broker.quote.EURUSD_m", {**good, "ts": T0 + 1, "bid": "1.08"}, msg_id="q2")
        await bus.publish_durable("broker.deal.EURUSD_m", b"{not json", msg_id="d1")
        await bus.close()

    asyncio.run(publish())
    context = build_sensor_context(resources={"bus": BusResource(url=nats.url), "warehouse": warehouse})
    message = _tick(context)
    assert message.startswith("3 messages: 0 account snapshots, 1 quotes, 0 deals stored; 2 refused")
    assert "quote bid is '1.08'" in message
    assert _tick(context) == "BROKER_DATA: nothing new"  # the refused ones are not redelivered
    quotes = read_quotes(warehouse)
    assert quotes["symbol"].to_list() == ["EURUSD.m"] and quotes["bid"].to_list() == [1.085]


def test_without_a_bus_the_sensor_says_so_and_starts_nothing(tmp_path, warehouse):
    port = free_port()
    context = build_sensor_context(resources={"bus": BusResource(store_dir=str(tmp_path / "nats"), embedded_port=port),
                                              "warehouse": warehouse})
    assert "no bus to drain" in _tick(context)
    assert not EmbeddedNatsServer(tmp_path / "nats", port=port).running()


def test_tradeforge_broker_publish_on_the_fake_terminal(nats, warehouse, monkeypatch, capsys):
    from orchestration.cli import main

    monkeypatch.setenv("NATS_URL", nats.url)
    assert main(["broker", "publish", "--fake", "--samples", "3", "--symbols", "EURUSD", "XAUUSD"]) == 0
    assert "published 3 account snapshots, 2 quotes, 0 deals" in capsys.readouterr().out  # a quote that never moves: once
    context = build_sensor_context(resources={"bus": BusResource(url=nats.url), "warehouse": warehouse})
    assert _tick(context).startswith("5 messages: 3 account snapshots, 2 quotes, 0 deals stored")
    assert read_account(warehouse).height == 3 and read_quotes(warehouse)["symbol"].to_list() == ["EURUSD", "XAUUSD"]


def test_a_batch_fetched_but_never_acknowledged_is_delivered_again(nats, warehouse):
    """A drain that dies between fetching (or writing) and acknowledging: once the consumer's
    ack_wait is over the next drain gets the batch again."""

    from resources.bus.streams import broker_data_stream
    from sensors.broker_data import _consumer, drain

    assert read_quotes(warehouse).is_empty()  # the schema is made now, not inside the drain's ack_wait

    async def scenario():
        bus = NatsBus(nats.url)
        await bus.connect()
        await bus.ensure_stream(broker_data_stream())
        for n in range(3):
            row = {"server": "Demo", "symbol": "EURUSD", "ts": T0 + n, "bid": 1.085, "ask": 1.08502}
            await bus.publish_durable("broker.quote.EURUSD", row, msg_id=f"q{n}")
        crashed = await _consumer(bus, broker_data_stream(), ack_wait_s=1.0)
        taken = await crashed.fetch(3, timeout=5)  # ... and the process dies before acknowledging
        await crashed.unsubscribe()
        await bus.close()
        await asyncio.sleep(1.2)
        first = await drain(NatsBus(nats.url), warehouse)
        second = await drain(NatsBus(nats.url), warehouse)
        return len(taken), first, second

    taken, first, second = asyncio.run(scenario())
    # at least once: a write slower than the 1 s ack_wait gets the batch once more, and the rows replace themselves
    assert taken == 3 and first.messages >= 3 and first.stored["quote"] == first.messages
    assert second.stored["quote"] == second.messages  # (0, unless a very slow write outlived its ack_wait again)
    assert read_quotes(warehouse)["ts"].dt.epoch("ms").to_list() == [T0, T0 + 1, T0 + 2]
