"""The bus on a real nats-server: JetStream with deduplication, request/reply, key-value,
an on-demand embedded server, events that never fail their emitter; no Dagster needed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from resources.bus import TRAINING_STREAM, BlockingBus, EmbeddedNatsServer, EventPublisher, NatsBus, StreamSpec
from tests.natsserver import dead_url, free_port, nats_server  # noqa: F401  (fixture)


def test_durable_publish_stores_a_message_id_once_and_replays(nats_server):
    async def scenario():
        bus = NatsBus(nats_server.url)
        await bus.connect()
        stream = StreamSpec("AUDIT", ("audit.>",))
        await bus.ensure_stream(stream)
        first = await bus.publish_durable("audit.order.EURUSD", {"id": 1}, msg_id="order-1")
        retry = await bus.publish_durable("audit.order.EURUSD", {"id": 1}, msg_id="order-1")
        other = await bus.publish_durable("audit.order.EURUSD", {"id": 2}, msg_id="order-2")
        info = await bus.js.stream_info("AUDIT")
        consumer = await bus.js.pull_subscribe("audit.>", durable="reader", stream="AUDIT")
        replay = [m.data for m in await consumer.fetch(10, timeout=2)]
        await bus.close()
        return first, retry, other, info.state.messages, replay

    first, retry, other, stored, replay = asyncio.run(scenario())
    assert (first, retry, other) == (True, False, True)
    assert stored == 2 and replay == [b'{"id":1}', b'{"id":2}']


def test_request_reply_and_key_value_from_synchronous_code(nats_server):
    bus = BlockingBus(NatsBus(nats_server.url))
    bus.connect()

    async def serve():
        async def answer(subject, data, raw):
            await raw.respond(b'{"echo": %d}' % (data["n"] * 2))

        await bus.bus.subscribe("svc.double", answer)

    asyncio.run_coroutine_threadsafe(serve(), bus._loop).result(5)
    assert bus.request("svc.double", {"n": 21}) == {"echo": 42}
    assert bus.kv_get("models", "champion") is None
    bus.kv_put("models", "champion", {"version": 3})
    assert bus.kv_get("models", "champion") == {"version": 3}
    bus.close()


def test_events_reach_the_stream_and_an_unreachable_bus_is_only_logged(nats_server, caplog):
    events = EventPublisher(lambda: BlockingBus(NatsBus(nats_server.url)), TRAINING_STREAM)
    events.publish("training.started.r1", {"run_id": "r1"}, msg_id="r1.started")
    events.publish("training.started.r1", {"run_id": "r1"}, msg_id="r1.started")  # a retry: stored once
    events.close()
    check = BlockingBus(NatsBus(nats_server.url))
    check.connect()
    info = asyncio.run_coroutine_threadsafe(check.bus.js.stream_info("TRAINING"), check._loop).result(5)
    check.close()
    assert events.available and events.published == 2 and info.state.messages == 1

    dead = EventPublisher(lambda: BlockingBus(NatsBus(dead_url(), connect_timeout_s=0.3)), TRAINING_STREAM)
    started = time.perf_counter()
    for i in range(20):
        dead.publish("training.progress.r2", {"i": i}, msg_id=f"r2.{i}")  # never raises
    assert dead.available is False and dead.published == 0 and "bus unreachable" in dead.problem
    assert time.perf_counter() - started < 10  # one connection attempt, not one per event
    assert sum("bus unreachable" in r.getMessage() for r in caplog.records) == 1


def test_the_embedded_server_starts_on_demand_and_keeps_jetstream_across_restarts(tmp_path):
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    assert not server.running()
    bus = BlockingBus(NatsBus(None, store_dir=tmp_path / "nats", embedded_port=server.port))
    try:
        bus.connect()  # nothing answered: started it
        assert server.running() and server.pid_file.exists()
        bus.ensure_stream(TRAINING_STREAM)
        bus.publish_durable("training.completed.x", {"ok": True}, msg_id="x.completed")
        bus.close()
        assert server.stop() and not server.running()
        server.start(detach=False)
        again = BlockingBus(NatsBus(server.url))
        again.connect()
        info = asyncio.run_coroutine_threadsafe(again.bus.js.stream_info("TRAINING"), again._loop).result(5)
        again.close()
        assert info.state.messages == 1
    finally:
        server.stop()


def test_bus_and_registry_clients_import_without_dagster():
    """The live runner uses these classes and never imports Dagster."""
    code = ("import sys; import resources.bus, resources.registry, models.learning.estimators, models.learning.folds; "
            "print('dagster' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
