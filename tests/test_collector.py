"""The live collector against a local Polygon WebSocket stub (auth, subscribe, status
messages, quote and trade arrays, drops) and Polygon's REST stub, publishing to a real
nats-server: the bars on the stream equal the batch's bars of the same ticks, a drop's missed
minutes are backfilled over REST, a restart resumes, and no bar is lost or doubled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from live.collector import Collector, CollectorConfig, CollectorError
from models.market.candles import aggregate
from models.market.live_candles import LiveCandles
from models.market.synthetic import generate_ticks
from models.market.ticks import conform_ticks
from models.market.timeframes import Timeframe
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.bus.messages import decode_bar, decode_ticks
from resources.vendors.polygon import PolygonResource
from tests.natsserver import free_port
from tests.polygon_ws import PolygonWebSocketStub, topic_of
from tests.stubs import PolygonStub, StubServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
T0 = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
MIN = 60_000
TFS = (Timeframe.M1, Timeframe.M5)


def _minutes(ticks: pl.DataFrame, start_ms: int, end_ms: int) -> pl.DataFrame:
    ms = ticks["ts"].dt.epoch("ms")
    return ticks.filter((ms >= start_ms) & (ms < end_ms))


@pytest.fixture(scope="module")
def tape() -> dict[str, pl.DataFrame]:
    """Half an hour of EURUSD quotes and BTCUSD trades (from the synthetic market's quotes)."""
    day = date(2024, 3, 5)
    window = (pl.col("ts") >= T0) & (pl.col("ts") < datetime(2024, 3, 5, 10, 30, tzinfo=UTC))
    eurusd = generate_ticks("EURUSD", day).filter(window).select("symbol", "ts", "bid", "ask")
    quotes = generate_ticks("BTCUSD", day).filter(window)
    rng = np.random.default_rng(5)
    btcusd = quotes.select("symbol", "ts", ((pl.col("bid") + pl.col("ask")) / 2).round(2).alias("price"),
                           pl.Series("size", rng.integers(1, 500, quotes.height) / 1000))
    return {"EURUSD": conform_ticks(eurusd.with_columns(pl.lit("polygon").alias("source"))),
            "BTCUSD": conform_ticks(btcusd.with_columns(pl.lit("polygon").alias("source")))}


@pytest.fixture
def nats(tmp_path) -> EmbeddedNatsServer:
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    yield server
    server.stop()


class ManualClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


async def until(condition, what: str, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def stored_bars(url: str) -> tuple[pl.DataFrame, list[str]]:
    """Every message of the BARS stream, decoded, and their Nats-Msg-Ids."""
    bus = NatsBus(url)
    await bus.connect()
    info = await bus.js.stream_info("BARS")
    rows, ids = [], []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await bus.js.get_msg("BARS", seq)
        rows.append(decode_bar(message.data, message.subject))
        ids.append(message.headers["Nats-Msg-Id"])
    await bus.close()
    frame = pl.DataFrame(rows).with_columns(pl.col("ts", "close_ts").cast(pl.Datetime("ms", "UTC")))
    return frame, ids


def batch_bars(tape: dict[str, pl.DataFrame], end_ms: int) -> pl.DataFrame:
    ticks = pl.concat([_minutes(t, T0_MS, end_ms) for t in tape.values()])
    return aggregate(ticks, None, TFS).with_columns(
        (pl.col("ts") + pl.duration(minutes=pl.when(pl.col("timeframe") == "M1").then(1).otherwise(5))).alias("close_ts"))


class Harness:
    """One collector, the WebSocket and REST stubs, a manual clock, and the ticks sent so far."""

    def __init__(self, tape, ws: PolygonWebSocketStub, rest_url: str, nats_url: str, clock: ManualClock) -> None:
        self.tape, self.ws, self.clock = tape, ws, clock
        self.sent = {s: 0 for s in tape}
        config = CollectorConfig(
            symbols=tuple(tape), timeframes=TFS, ws_url=ws.url, grace_s=2.0, margin_s=2.0, backfill_delay_s=1.0,
            check_interval_s=0.01, backoff_initial_s=0.01, backoff_max_s=0.05,
        )
        self.collector = Collector(config, KEY, NatsBus(nats_url), PolygonResource(api_key=KEY, base_url=rest_url, attempts=1),
                                   clock=clock, progress=lambda line: None)
        self.task: asyncio.Task | None = None

    async def start(self, connections: int = 2) -> None:
        self.task = asyncio.create_task(self.collector.run())
        await until(lambda: self.collector.stats.connections >= connections, "the feeds to go live")

    async def send(self, start_ms: int, end_ms: int) -> None:
        """The ticks of ``[start, end)``, as the feed delivers them, and wait until received."""
        for symbol, ticks in self.tape.items():
            ms = ticks["ts"].dt.epoch("ms")
            first = int((ms < start_ms).sum())
            part = _minutes(ticks, start_ms, end_ms)
            assert await self.ws.send_ticks(symbol, part, first_row=first) == 1
            self.sent[symbol] += part.height
        await until(lambda: all(self.collector.stats.received[s] == n for s, n in self.sent.items()), "the ticks")

    async def play(self, first_minute_ms: int, last_minute_ms: int) -> None:
        for minute in range(first_minute_ms, last_minute_ms + MIN, MIN):
            self.clock.ms = minute + 59_900
            await self.send(minute, minute + MIN)

    async def stop(self) -> None:
        self.collector.stop()
        await self.task


def _rest_windows(rest: StubServer) -> set[tuple[str, int, int]]:
    return {(r.path.rsplit("/", 1)[1], int(r.query["timestamp.gte"]) // 1_000_000, int(r.query["timestamp.lt"]) // 1_000_000)
            for r in rest.requests if "timestamp.gte" in r.query}


def _rest_stub(tape) -> PolygonStub:
    stub = PolygonStub(KEY)
    stub.quotes["C:EURUSD"] = tape["EURUSD"]
    stub.trades["X:BTCUSD"] = tape["BTCUSD"]
    return stub


def test_live_bars_equal_the_batch_and_a_drop_is_backfilled_without_a_bar_lost_or_doubled(tape, nats):
    end = T0_MS + 30 * MIN

    async def scenario():
        ws = await PolygonWebSocketStub(KEY).start()
        with StubServer(_rest_stub(tape)) as rest:
            h = Harness(tape, ws, rest.url, nats.url, ManualClock(T0_MS + 5_000))
            await h.start()  # subscribed at 10:00:05: live from 10:01 (2 s margin), 10:00 from REST
            assert {t for _, t in ws.subscriptions} == {topic_of("EURUSD"), topic_of("BTCUSD")}
            await h.play(T0_MS, T0_MS + 9 * MIN)
            h.clock.ms = T0_MS + 10 * MIN + 30_000
            await h.send(T0_MS + 10 * MIN, T0_MS + 10 * MIN + 30_000)  # half of 10:10, then the network fails
            ws.down = True
            assert ws.drop() == 2
            await until(lambda: ws.refused >= 2, "reconnects refused while the server is down")
            h.clock.ms = T0_MS + 14 * MIN + 20_000  # back at 10:14:20: live from 10:15
            ws.down = False
            await until(lambda: h.collector.stats.connections == 4, "the reconnect")
            await h.send(T0_MS + 14 * MIN + 20_000, T0_MS + 15 * MIN)  # before 10:15: the backfill's
            await h.play(T0_MS + 15 * MIN, T0_MS + 29 * MIN)
            h.clock.ms = end + 3_000
            expected = batch_bars(tape, end)
            await until(lambda: h.collector.stats.bars_published == expected.height, "every bar")
            stats = h.collector.stats
            await h.stop()
            await ws.stop()
            return expected, stats, _rest_windows(rest), await stored_bars(nats.url)

    expected, stats, windows, (stored, ids) = asyncio.run(scenario())
    # no bar lost or doubled: one message per bar, each id once, 30 M1 and 6 M5 bars per symbol
    assert stored.height == expected.height == 72 and len(set(ids)) == len(ids)
    key = ["symbol", "timeframe", "ts"]
    assert stored.select(expected.columns).sort(key).equals(expected.sort(key))  # every column, exactly
    # the gaps came from REST: the start's first minute and the outage's minutes, nothing else
    assert windows == {(f"{p}:{s}", T0_MS + a * MIN, T0_MS + b * MIN)
                       for p, s in (("C", "EURUSD"), ("X", "BTCUSD")) for a, b in ((0, 1), (10, 15))}
    for symbol, ticks in tape.items():
        filled = {(a, b): n for s, a, b, n in stats.backfills if s == symbol}
        assert filled == {(T0_MS, T0_MS + MIN): _minutes(ticks, T0_MS, T0_MS + MIN).height,
                          (T0_MS + 10 * MIN, T0_MS + 15 * MIN): _minutes(ticks, T0_MS + 10 * MIN, T0_MS + 15 * MIN).height}
        skipped = _minutes(ticks, T0_MS, T0_MS + MIN).height + _minutes(ticks, T0_MS + 14 * MIN + 20_000, T0_MS + 15 * MIN).height
        assert stats.before_live[symbol] == skipped
    assert stats.drops == 2 and stats.ticks_published > 0  # one per feed; refused retries back off inside


def test_a_restarted_collector_resumes_after_the_stream_s_last_bars(tape, nats):
    async def scenario():
        ws = await PolygonWebSocketStub(KEY).start()
        with StubServer(_rest_stub(tape)) as rest:
            first = Harness(tape, ws, rest.url, nats.url, ManualClock(T0_MS + 5_000))
            await first.start()
            await first.play(T0_MS, T0_MS + 11 * MIN)
            first.clock.ms = T0_MS + 12 * MIN + 2_500  # M1 10:11 closes; M5 last closed 10:05
            await until(lambda: first.collector.stats.bars_published == 2 * (12 + 2), "the first run's bars")
            await first.stop()
            await ws.wait_closed()
            # down from 10:12 to 10:17:30; the new process resumes at 10:10 (M5's end) and backfills to 10:18
            second = Harness(tape, ws, rest.url, nats.url, ManualClock(T0_MS + 17 * MIN + 30_000))
            await second.start()
            await second.send(T0_MS + 17 * MIN + 30_000, T0_MS + 18 * MIN)
            await second.play(T0_MS + 18 * MIN, T0_MS + 24 * MIN)
            second.clock.ms = T0_MS + 25 * MIN + 3_000
            expected = batch_bars(tape, T0_MS + 25 * MIN)
            await until(lambda: first.collector.stats.bars_published + second.collector.stats.bars_published
                        == expected.height, "the second run's bars")
            await asyncio.sleep(0.05)  # nothing more comes
            await second.stop()
            await ws.stop()
            return expected, first.collector.stats, second.collector.stats, _rest_windows(rest), await stored_bars(nats.url)

    expected, one, two, windows, (stored, ids) = asyncio.run(scenario())
    key = ["symbol", "timeframe", "ts"]
    assert stored.height == expected.height == 2 * (25 + 5) and len(set(ids)) == len(ids)
    assert stored.select(expected.columns).sort(key).equals(expected.sort(key))
    assert (one.bars_published, two.bars_published, two.bars_already_stored) == (28, 32, 0)
    assert ("C:EURUSD", T0_MS + 10 * MIN, T0_MS + 18 * MIN) in windows


def test_a_refused_key_is_one_clear_line(tape, nats):
    async def scenario():
        ws = await PolygonWebSocketStub("the-real-key").start()
        config = CollectorConfig(symbols=("EURUSD",), timeframes=TFS, ws_url=ws.url, backoff_initial_s=0.01)
        collector = Collector(config, KEY, NatsBus(nats.url), PolygonResource(api_key=KEY), progress=lambda line: None)
        try:
            with pytest.raises(CollectorError) as caught:
                await collector.run()
        finally:
            await ws.stop()
        return str(caught.value)

    message = asyncio.run(scenario())
    assert "POLYGON_API_KEY" in message and "\n" not in message


def test_ticks_are_published_and_bad_ones_rejected_by_the_batch_rules(tape, nats):
    """A crossed quote, a price of another instrument and a repeated trade id are kept out of
    the bars (and counted), the good ticks reach ``ticks.{SYM}``."""
    builder = LiveCandles("EURUSD", [Timeframe.M1], T0_MS)
    good = _minutes(tape["EURUSD"], T0_MS, T0_MS + MIN)
    bad = good.head(2).with_columns(pl.Series("bid", [1.2, 150.0]), pl.Series("ask", [1.1, 150.01]))
    kept = builder.add(pl.concat([good, bad]))
    assert kept.height == good.height
    assert builder.counts["rejected:crossed_quote"] == 1 and builder.counts["rejected:implausible_price"] == 1
    bars = builder.close(T0_MS + MIN)
    assert bars.drop("close_ts").equals(aggregate(good, None, [Timeframe.M1]))
    trades = LiveCandles("BTCUSD", [Timeframe.M1], T0_MS)
    part = _minutes(tape["BTCUSD"], T0_MS, T0_MS + MIN).with_columns(pl.int_range(pl.len()).cast(pl.Int64).alias("vendor_seq"))
    trades.add(part)
    assert trades.add(part.tail(3)).height == 0 and trades.counts["rejected:duplicate"] == 3

    async def ticks_on_the_bus():
        bus = NatsBus(nats.url)
        await bus.connect()
        got = asyncio.get_running_loop().create_future()

        async def handler(subject, data, raw):
            if not got.done():
                got.set_result(decode_ticks(raw.data))

        await bus.subscribe("ticks.>", handler)
        ws = await PolygonWebSocketStub(KEY).start()
        with StubServer(_rest_stub(tape)) as rest:
            h = Harness({"EURUSD": tape["EURUSD"]}, ws, rest.url, nats.url, ManualClock(T0_MS + 5_000))
            await h.start(connections=1)
            await h.send(T0_MS + MIN, T0_MS + MIN + 10_000)
            message = await asyncio.wait_for(got, 5)
            await h.stop()
        await ws.stop()
        await bus.close()
        return message

    message = asyncio.run(ticks_on_the_bus())
    sent = _minutes(tape["EURUSD"], T0_MS + MIN, T0_MS + MIN + 10_000)
    assert message["symbol"] == "EURUSD" and message["ts"] == sent["ts"].dt.epoch("ms").head(len(message["ts"])).to_list()
    assert message["bid"] == sent["bid"].head(len(message["bid"])).to_list()


def test_live_modules_import_without_dagster():
    code = ("import sys, live.collector, live.replay, live.broker_data, live.publishing; "
            "assert 'dagster' not in sys.modules, [m for m in sys.modules if m.startswith('dagster')][:3]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_tradeforge_live_collect_without_a_key_is_one_line(monkeypatch, capsys):
    from orchestration.cli import main

    monkeypatch.delenv("POLYGON_API_KEY", raising=False)
    assert main(["live", "collect", "--symbols", "EURUSD"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "POLYGON_API_KEY is not set" in err
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    assert main(["live", "collect", "--symbols", "EURXYZ"]) == 1
    assert "unknown instrument 'EURXYZ'" in capsys.readouterr().err
