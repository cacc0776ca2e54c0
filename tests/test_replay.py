"""The replay: bars from the embedded warehouse onto a real nats-server's BARS stream, in the
order they became known, at a chosen pace; a restarted or repeated replay stores nothing twice;
``tradeforge live replay`` end to end (in-process: the embedded warehouse is this process's)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from live.replay import Replay, parse_speed, with_close_ts
from models.market.candles import BAR_SCHEMA, aggregate_ticks
from models.market.synthetic import generate_ticks
from models.market.timeframes import Timeframe
from orchestration.cli import main
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.bus.messages import decode_bar
from resources.bus.streams import bars_stream, last_bar_ts
from resources.warehouse.market import write_bars
from tests.natsserver import free_port

DAY = date(2024, 3, 5)


@pytest.fixture
def nats(tmp_path) -> EmbeddedNatsServer:
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def m5() -> pl.DataFrame:
    """M5 bars of two symbols on one day, from the synthetic market (EURUSD closes for the
    FX day at 22:00 UTC, BTCUSD trades on)."""
    ticks = pl.concat([generate_ticks(s, DAY) for s in ("EURUSD", "BTCUSD")])
    return aggregate_ticks(ticks, [Timeframe.M5])


async def stream_contents(url: str) -> tuple[list[dict], list[str], list[str]]:
    bus = NatsBus(url)
    await bus.connect()
    info = await bus.js.stream_info("BARS")
    bars, ids, subjects = [], [], []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else []:
        message = await bus.js.get_msg("BARS", seq)
        bars.append(decode_bar(message.data, message.subject))
        ids.append(message.headers["Nats-Msg-Id"])
        subjects.append(message.subject)
    await bus.close()
    return bars, ids, subjects


def as_frame(bars: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(bars).with_columns(pl.col("ts", "close_ts").cast(pl.Datetime("ms", "UTC")))


def test_a_restarted_replay_resumes_and_a_repeated_one_stores_nothing_twice(m5, nats):
    chunks = [m5.filter(pl.col("ts").dt.hour() < 12), m5.filter(pl.col("ts").dt.hour() >= 12)]
    seen: list[int] = []

    async def scenario():
        first = Replay(NatsBus(nats.url), progress=lambda line: None)
        task = asyncio.create_task(first.run(chunks))
        while first.stats.published < 100:  # a crash mid-replay
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        seen.append(first.stats.published)
        second = await Replay(NatsBus(nats.url), progress=lambda line: None).run(chunks)
        again = await Replay(NatsBus(nats.url), resume=False, progress=lambda line: None).run(chunks)
        bus = NatsBus(nats.url)
        await bus.connect()
        last = await last_bar_ts(bus.js, "EURUSD", "M5")
        await bus.close()
        return second, again, last, await stream_contents(nats.url)

    second, again, last, (bars, ids, subjects) = asyncio.run(scenario())
    first_published = seen[0]
    assert first_published >= 100
    # every bar once: the restart skipped what the first run stored, the repeat was refused by id
    assert len(bars) == m5.height == len(set(ids))
    # (a bar or two in flight when the task was cancelled were stored without being counted by the first run)
    assert first_published <= second.already_on_bus <= first_published + 2
    assert second.published + second.already_on_bus == m5.height and second.duplicates == 0
    assert (again.published, again.duplicates) == (0, m5.height)
    stored = as_frame(bars)
    expected = with_close_ts(m5)
    order = ["close_ts", "timeframe", "symbol"]
    assert stored.select(expected.columns).sort(order).equals(expected)  # the columns exactly
    assert stored["close_ts"].is_sorted()  # in the order bars became known
    for symbol in ("EURUSD", "BTCUSD"):
        per_subject = stored.filter(pl.col("symbol") == symbol)["ts"]
        assert per_subject.is_sorted() and per_subject.n_unique() == per_subject.len()
    assert last == int(m5.filter(pl.col("symbol") == "EURUSD")["ts"].max().timestamp() * 1000)
    assert set(subjects) == {"bars.EURUSD.M5", "bars.BTCUSD.M5"}


def test_the_pace_follows_the_bars_close_times(nats):
    """x60: a bar closing an hour after the first goes out a minute after it; the weekend gap
    stretches accordingly. The clock is the test's, so the check is exact, not a timing."""
    opens = [datetime(2024, 3, 8, 21, 55, tzinfo=UTC), datetime(2024, 3, 8, 22, 0, tzinfo=UTC),
             datetime(2024, 3, 10, 21, 5, tzinfo=UTC), datetime(2024, 3, 10, 21, 10, tzinfo=UTC)]
    bars = pl.DataFrame({"symbol": "EURUSD", "timeframe": "M5", "ts": opens, "open": 1.0, "high": 1.1, "low": 0.9,
                         "close": 1.05, "bid_close": 1.0499, "ask_close": 1.0501, "volume": 0.0, "tick_count": 10,
                         "quote_count": 10, "spread_mean": 0.0002, "spread_max": 0.0003, "vwap": 1.01, "source": "test"},
                        ).cast(BAR_SCHEMA)  # type: ignore[arg-type]
    now = [1000.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the replay's clock: time passes only when it waits
        waits.append(seconds)
        now[0] += seconds

    replay = Replay(NatsBus(nats.url), speed=60, sleep=sleep, monotonic=lambda: now[0], progress=lambda line: None)
    stats = asyncio.run(replay.run([bars]))
    assert stats.published == 4
    sent_at = [sum(waits[:k]) for k in range(len(waits) + 1)]  # each bar goes out right after its wait
    closes = [(o - opens[0]).total_seconds() for o in opens]
    assert sent_at == pytest.approx([c / 60 for c in closes])  # 0, 5 s, 47 min 10 s, 47 min 15 s
    assert parse_speed("max") is None and parse_speed("1") == 1.0 and parse_speed("60") == 60.0
    with pytest.raises(ValueError, match="--speed"):
        parse_speed("-3")


def test_tradeforge_live_replay_reads_the_warehouse_and_resumes(m5, nats, warehouse, monkeypatch, capsys):
    for symbol in ("EURUSD", "BTCUSD"):
        part = m5.filter(pl.col("symbol") == symbol)
        write_bars(warehouse, symbol, [DAY], part.with_columns(pl.lit(datetime(2024, 3, 6, tzinfo=UTC)).alias("covered_until")))
    monkeypatch.setenv("TRADEFORGE_WAREHOUSE_PATH", warehouse.embedded_path)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", warehouse.database)
    monkeypatch.setenv("NATS_URL", nats.url)
    args = ["live", "replay", "--symbols", "eurusd", "BTCUSD", "--timeframe", "M5", "--start", "2024-03-05",
            "--end", "2024-03-06", "--speed", "max"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done in" in out and f"{m5.height:,} bars published, 0 already on the bus" in out
    assert "replay: " in out and "(100% of the range)" in out
    assert main(args) == 0  # again: everything is already there
    out = capsys.readouterr().out
    assert f"0 bars published, {m5.height:,} already on the bus (skipped)" in out
    bars, ids, _ = asyncio.run(stream_contents(nats.url))
    assert len(bars) == len(set(ids)) == m5.height
    assert main(["live", "replay", "--symbols", "EURUSD", "--start", "2024-03-07", "--end", "2024-03-08"]) == 1
    assert "no M5 bars of EURUSD from 2024-03-07 to 2024-03-08" in capsys.readouterr().err


def test_the_bars_stream_takes_its_retention_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRADEFORGE_BARS_RETENTION_DAYS", "2")
    monkeypatch.setenv("TRADEFORGE_BARS_DEDUP_MINUTES", "30")
    spec = bars_stream()
    assert (spec.name, spec.subjects, spec.max_age, spec.duplicate_window) == ("BARS", ("bars.>",), timedelta(days=2),
                                                                               timedelta(minutes=30))
    monkeypatch.setenv("TRADEFORGE_BARS_RETENTION_DAYS", "0")
    assert bars_stream().max_age is None
    monkeypatch.setenv("TRADEFORGE_BARS_RETENTION_DAYS", "a week")
    with pytest.raises(ValueError, match="TRADEFORGE_BARS_RETENTION_DAYS"):
        bars_stream()


def test_a_nats_restart_mid_replay_loses_and_doubles_no_bar(m5, tmp_path):
    """The server goes down mid-replay and comes back on the same store: the publisher waits,
    retries each bar with its id, and the stream ends with every bar once, in order."""
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)

    async def scenario():
        replay = Replay(NatsBus(server.url), progress=lambda line: None)
        task = asyncio.create_task(replay.run([m5]))
        while replay.stats.published < 200:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.start, False)
        stats = await asyncio.wait_for(task, 60)
        return stats, replay.publisher.outages, await stream_contents(server.url)

    try:
        stats, outages, (bars, ids, _) = asyncio.run(scenario())
    finally:
        server.stop()
    assert outages >= 1 and stats.published + stats.duplicates == m5.height
    assert len(bars) == len(set(ids)) == m5.height
    stored = as_frame(bars)
    order = ["close_ts", "timeframe", "symbol"]  # symbols of one close time may swap places on a retry
    assert stored.select(with_close_ts(m5).columns).sort(order).equals(with_close_ts(m5))
    for symbol in ("EURUSD", "BTCUSD"):
        assert stored.filter(pl.col("symbol") == symbol)["ts"].is_sorted()  # a subject never out of order
