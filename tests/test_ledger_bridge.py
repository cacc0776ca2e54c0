"""The data-bridge: a runner's ledger, published to the real JetStream ledger streams, drained by
the Dagster sensor into the embedded warehouse.

The ledger is the one the runner makes: the backtest's TradingEngine with the paper broker
stepping over bars of two symbols (model signals through the model strategy, a model swap
half-way, risk limits that reject entries and trip the kill switch), its messages built by
live/ledger.py's LedgerWriter around each bar as live/runner.py builds them. The tables must
hold exactly the engine's signals, orders (every transition), fills, risk events, positions and
equity per bar; a full redelivery stores nothing twice; a bad message is refused with its
reason and not redelivered; without a bus the sensor starts none."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from dagster import build_sensor_context

from live.config import RunnerConfig
from live.ledger import LedgerWriter, Message, Window
from live.runner import make_broker
from models.trading.engine import EngineConfig, TradingEngine
from models.trading.risk import RiskConfig, RiskModel
from models.trading.strategy import ModelStrategy
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.bus.resource import BusResource
from resources.bus.streams import ledger_streams
from resources.warehouse.ledger import read_ledger, read_order_states, read_signals
from sensors.ledger import CONSUMER, drain, drain_ledger
from tests.live_support import BAR_MS, START, make_bars
from tests.natsserver import free_port

RUNNER = "bridge-test"
SYMBOLS = ("EURUSD", "XAUUSD")
BARS = 60  # per symbol
SWAP = 32  # the model's alias moves from version 3 to 4 after this many bars (before the kill switch trips)


@pytest.fixture
def nats(tmp_path) -> EmbeddedNatsServer:
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    yield server
    server.stop()


@dataclass
class Run:
    """A runner's bars through the engine: its ledger messages and what the engine held after each bar."""

    engine: TradingEngine
    specs: dict
    messages: list[Message] = field(default_factory=list)
    per_bar: list[dict] = field(default_factory=list)  # bar_seq, ts, symbol, equity, balance, positions, model version


def _run() -> Run:
    config = RunnerConfig(symbols=SYMBOLS, timeframe="M5", model="direction@champion", name=RUNNER,
                          risk=RiskConfig(risk_fraction=0.01, stop_atr=1.0, max_open_positions=1, max_drawdown=0.01))
    broker, specs = make_broker(config)
    engine = TradingEngine(EngineConfig(config.strategy, config.initial_equity), RiskModel(config.risk), broker, specs)
    strategy = ModelStrategy(column="prob_up", long_above=0.55, short_below=0.45, exit_between=True)
    ledger = LedgerWriter(RUNNER, "M5")
    bars = pl.concat([make_bars(s, START, BARS, seed=3 + i) for i, s in enumerate(SYMBOLS)]).sort("ts", "symbol")
    probs = np.random.default_rng(5).uniform(size=bars.height)
    run, marks, peak = Run(engine, specs=specs), {}, config.initial_equity
    for n, (bar, prob) in enumerate(zip(bars.iter_rows(named=True), probs, strict=True), start=1):
        symbol, ts = bar["symbol"], int(bar["ts"].timestamp() * 1000)
        model = SimpleNamespace(name="direction", version="3" if n <= SWAP else "4", column="prob_up")  # the alias moved
        window = Window(engine)
        if n == SWAP + 1:  # as LiveRunner._maintain when the alias moved
            run.messages.append(ledger.alert("model_swap", model.version, ts, "", "direction v3 -> direction v4",
                                             model_version=model.version))
        if n == 7:  # as LiveRunner._refuse: a bar message sent twice
            run.messages.append(ledger.alert("bad_bar", "7", ts, symbol, "duplicate: EURUSD bar is not after the last one",
                                             subject="bars.EURUSD.M5", stream_seq=7))
        signal = strategy.signals(pl.DataFrame({"prob_up": [float(prob)]})).row(0, named=True)
        engine.on_bar(symbol, {"ts": ts, **{k: bar[k] for k in ("open", "high", "low", "close", "bid_close", "ask_close")}},
                      signal)
        marks[symbol] = bar["close"]
        peak = max(peak, engine.equity())
        # as LiveRunner.handle: the signal, what the bar changed, the account
        run.messages.append(ledger.signal(symbol, ts, ts + BAR_MS, model, float(prob), signal, "signal", "", "fs-test"))
        run.messages += ledger.changes(engine, window, str(n), ts, model.version)
        run.messages.append(ledger.portfolio(engine, n, ts, symbol, marks, peak, model.version))
        run.per_bar.append({"bar_seq": n, "ts": ts, "symbol": symbol, "equity": engine.equity(),
                            "balance": engine.portfolio.balance, "model_version": model.version, "side": signal["side"],
                            "positions": {s: p.units for s, p in engine.portfolio.positions.items() if p.units},
                            "marks": dict(marks)})
    return run


async def _publish(url: str, messages: list[Message]) -> int:
    """As LiveRunner._publish: JetStream, the message's id as Nats-Msg-Id; returns how many were new."""
    bus = NatsBus(url)
    await bus.connect()
    for spec in ledger_streams():
        await bus.ensure_stream(spec)
    new = 0
    for m in messages:
        ack = await bus.js.publish(m.subject, json.dumps(m.data, separators=(",", ":")).encode(), timeout=2.0,
                                   headers={"Nats-Msg-Id": m.msg_id})
        new += not ack.duplicate
    await bus.close()
    return new


def _tick(context) -> str:
    return drain_ledger.evaluate_tick(context).skip_message


def _context(nats, warehouse):
    return build_sensor_context(resources={"bus": BusResource(url=nats.url), "warehouse": warehouse})


def _ms(frame: pl.DataFrame, column: str) -> list[int]:
    return frame[column].dt.epoch("ms").to_list()


def _version(ts: int) -> str:
    """The model version serving the bar opening at ``ts`` (two symbols a bar time)."""
    return "3" if ts < START.timestamp() * 1000 + SWAP // 2 * BAR_MS else "4"


def _tables(warehouse) -> dict[str, pl.DataFrame]:
    with warehouse.session() as session:
        return {t: read_ledger(session, t, RUNNER) for t in
                ("trading_signals", "orders", "executions", "positions", "portfolio_value", "risk_events")}


def test_the_sensor_stores_exactly_the_engines_ledger_once(nats, warehouse):
    run = _run()
    engine = run.engine
    assert asyncio.run(_publish(nats.url, run.messages)) == len(run.messages)
    assert asyncio.run(_publish(nats.url, run.messages[:50])) == 0  # a bar done again: JetStream stores it once
    rejected = [e for e in engine.risk_events if not e.approved]
    assert len(engine.fills) >= 5 and len(rejected) >= 10 and engine.kill.value == "halt"  # the run has all of it

    context = _context(nats, warehouse)
    first = _tick(context)
    transitions = sum(len(o.history) for o in engine.orders.values())
    n = 2 * BARS
    assert first.startswith(f"{len(run.messages):,} ledger messages: {n} trading_signals, {transitions} orders, "
                            f"{len(engine.fills)} executions")
    assert _tick(context) == "ledger: nothing new"
    tables = _tables(warehouse)

    signals = tables["trading_signals"]
    assert signals.height == n and _ms(signals, "ts") == [b["ts"] for b in run.per_bar]
    assert signals["model_version"].to_list() == [b["model_version"] for b in run.per_bar]
    assert signals["side"].to_list() == [None if s is None else int(s) for s in (b["side"] for b in run.per_bar)]
    assert _ms(signals, "close_ts") == [b["ts"] + BAR_MS for b in run.per_bar] and set(signals["timeframe"]) == {"M5"}

    orders = tables["orders"]
    history = sorted((o.client_id, k, e.value, s.value)
                     for o in engine.orders.values() for k, (e, s) in enumerate(o.history))
    assert sorted(orders.select("client_id", "seq", "event", "status").rows()) == history  # every transition, once
    states = read_order_states(warehouse, RUNNER)
    assert states.height == len(engine.orders)
    for row in states.iter_rows(named=True):
        order = engine.orders[row["client_id"]]
        assert (row["status"], row["symbol"], row["side"], row["intent"], row["qty"], row["filled_qty"]) == (
            order.state.value, order.symbol, int(order.side), order.intent, order.qty, order.filled_qty)
        assert row["avg_fill_price"] == order.avg_fill_price and row["parent_id"] == order.parent_id
        assert int(row["bar_ts"].timestamp() * 1000) == order.bar_ts
    # each transition names the model version serving the bar it happened on (the swap: after bar SWAP)
    assert orders["model_version"].to_list() == [_version(t) for t in _ms(orders, "ts")]
    assert {"3", "4"} <= set(orders["model_version"])

    fills = tables["executions"].sort("ts", "fill_id")
    expected = pl.DataFrame([f.to_dict() for f in engine.fills]).sort("ts", "fill_id")
    assert fills["fill_id"].to_list() == expected["fill_id"].to_list()
    assert fills["client_id"].to_list() == expected["client_id"].to_list()
    for column in ("qty", "price", "commission", "conv", "mid"):
        assert fills[column].to_list() == expected[column].to_list(), column  # the engine's floats, exactly
    assert fills["side"].to_list() == expected["side"].to_list() and _ms(fills, "ts") == expected["ts"].to_list()

    alerts = tables["risk_events"].filter(pl.col("source") == "runner").sort("ts")
    assert alerts.select("event_id", "kind", "approved", "model_version", "details").rows() == [
        (f"bad_bar:{RUNNER}:7", "bad_bar", False, "", '{"stream_seq":7,"subject":"bars.EURUSD.M5"}'),
        (f"model_swap:{RUNNER}:4", "model_swap", False, "4", ""),
    ]
    assert alerts["reason"].to_list()[1] == "direction v3 -> direction v4"
    events = tables["risk_events"].filter(pl.col("source") == "engine").sort("ts", "event_id")
    mine = sorted(((e.ts, e.symbol, e.kind, e.approved, e.reason, e.client_id, e.qty) for e in engine.risk_events))
    assert sorted(zip(_ms(events, "ts"), *(events[c].to_list() for c in
                                            ("symbol", "kind", "approved", "reason", "client_id", "qty")))) == mine
    assert "kill_switch" in set(events["kind"])
    assert events["model_version"].to_list() == [_version(t) for t in _ms(events, "ts")]

    answered = read_signals(warehouse, RUNNER)  # each signal beside the risk model's answer on its bar
    for kind in ("entry", "exit"):
        asked = {(e.symbol, e.ts): (e.approved, e.reason) for e in engine.risk_events if e.kind == kind}
        got = {(r["symbol"], int(r["ts"].timestamp() * 1000)): (r[f"{kind}_approved"], r[f"{kind}_reason"])
               for r in answered.iter_rows(named=True) if r[f"{kind}_approved"] is not None}
        assert asked and got == asked, kind
    assert answered.height == n

    equity = tables["portfolio_value"]
    assert equity["bar_seq"].to_list() == list(range(1, n + 1))
    assert equity["equity"].to_list() == [b["equity"] for b in run.per_bar]  # the engine's equity after each bar
    assert equity["balance"].to_list() == [b["balance"] for b in run.per_bar]
    # the margin and gross notional the positions held, as the backtest reports them (USD-quoted symbols: no conversion)
    notional = [sum(abs(u) * b["marks"][s] for s, u in b["positions"].items()) for b in run.per_bar]
    margin = [sum(abs(u) * b["marks"][s] / run.specs[s].leverage for s, u in b["positions"].items()) for b in run.per_bar]
    assert equity["exposure"].to_list() == pytest.approx(notional, rel=1e-12) and max(notional) > 0
    assert equity["margin"].to_list() == pytest.approx(margin, rel=1e-12) and max(margin) > 0
    assert equity["kill"].to_list()[-1] == "halt" and equity["symbol"].to_list() == [b["symbol"] for b in run.per_bar]

    positions = tables["positions"]
    held = sorted((b["bar_seq"], s, u) for b in run.per_bar for s, u in b["positions"].items())
    assert held and sorted(positions.select("bar_seq", "symbol", "units").rows()) == held
    assert equity["open_positions"].to_list() == [len(b["positions"]) for b in run.per_bar]


def test_a_full_redelivery_stores_nothing_twice(nats, warehouse):
    run = _run()
    asyncio.run(_publish(nats.url, run.messages))
    context = _context(nats, warehouse)
    first = _tick(context)
    before = _tables(warehouse)

    async def forget_the_consumers():  # their state lost: every stream is delivered again from its start
        bus = NatsBus(nats.url)
        await bus.connect()
        for spec in ledger_streams():
            await bus.js.delete_consumer(spec.name, CONSUMER)
        await bus.close()

    asyncio.run(forget_the_consumers())
    assert _tick(context) == first  # everything written again ...
    after = _tables(warehouse)
    for table, frame in before.items():
        assert frame.height and after[table].equals(frame), table  # ... and every row replaced itself

    # a drain that dies after fetching (and maybe writing) and before acknowledging: delivered again
    asyncio.run(forget_the_consumers())

    async def crash_then_drain():
        bus = NatsBus(nats.url)
        await bus.connect()
        from resources.bus.drain import durable_consumer

        for spec in ledger_streams():
            sub = await durable_consumer(bus, spec, CONSUMER, ack_wait_s=1.0, description="crashed")
            pending = (await bus.js.consumer_info(spec.name, CONSUMER)).num_pending
            assert len(await sub.fetch(pending, timeout=2)) == pending  # ... and never acknowledged
            await sub.unsubscribe()
        await bus.close()
        await asyncio.sleep(1.2)
        return await drain(NatsBus(nats.url), warehouse)

    again = asyncio.run(crash_then_drain())
    assert again.messages >= len(run.messages) and not again.refused
    assert all(_tables(warehouse)[t].equals(f) for t, f in before.items())


def test_a_bad_message_is_refused_with_its_reason_and_not_redelivered(nats, warehouse):
    run = _run()
    good = run.messages[:30]
    signal = next(m for m in good if m.subject == "signals.EURUSD")
    order = next(m for m in run.messages if m.subject.startswith("orders."))
    portfolio = next(m for m in good if m.subject.startswith("portfolio."))
    fill = next(m for m in run.messages if m.subject.startswith("broker.fill."))
    good.append(Message(fill.subject, {**fill.data, "fill_id": "mt5-1", "conv": float("nan"), "mid": float("nan")},
                        f"fill:{RUNNER}:mt5-1"))  # an MT5 fill that did not know the rate: stored, not refused
    bad = [
        Message("orders.filled.EURUSD", b"{not json", "bad-1"),  # type: ignore[arg-type]
        Message("signals.XAUUSD", {**signal.data, "ts": "yesterday"}, "bad-2"),
        Message("portfolio." + RUNNER, {k: v for k, v in portfolio.data.items() if k != "equity"}, "bad-3"),
        Message(f"orders.filled.{order.data['symbol']}", {**order.data, "status": "new"}, "bad-4"),
    ]

    async def publish():
        bus = NatsBus(nats.url)
        await bus.connect()
        for spec in ledger_streams():
            await bus.ensure_stream(spec)
        for m in [*good, *bad]:
            payload = m.data if isinstance(m.data, bytes) else json.dumps(m.data).encode()
            await bus.js.publish(m.subject, payload, headers={"Nats-Msg-Id": m.msg_id})
        await bus.close()

    asyncio.run(publish())
    context = _context(nats, warehouse)
    result = asyncio.run(drain(NatsBus(nats.url), warehouse))
    assert result.messages == len(good) + 4
    sym = order.data["symbol"]
    assert sorted((subject, reason.split(" (")[0]) for _, _, subject, reason in result.refused) == sorted([
        ("orders.filled.EURUSD", "malformed: not JSON"),
        ("signals.XAUUSD", "malformed: signal ts is 'yesterday'"),
        ("portfolio." + RUNNER, "malformed: portfolio lacks equity"),
        (f"orders.filled.{sym}", f"mismatch: order status on orders.filled.{sym} says 'new'"),
    ])
    assert _tick(context) == "ledger: nothing new"  # the refused ones are not delivered again
    tables = _tables(warehouse)
    assert tables["trading_signals"].height == sum(m.subject.count(".") == 1 and m.subject.startswith("signals.")
                                                   for m in good)
    assert tables["portfolio_value"].height == sum(m.subject.startswith("portfolio.") for m in good)
    mt5 = tables["executions"].filter(pl.col("fill_id") == "mt5-1")
    assert mt5.select("price", "conv", "mid").row(0) == (fill.data["price"], None, None)


def test_without_a_bus_the_sensor_says_so_and_starts_nothing(tmp_path, warehouse):
    port = free_port()
    context = build_sensor_context(resources={"bus": BusResource(store_dir=str(tmp_path / "nats"), embedded_port=port),
                                              "warehouse": warehouse})
    assert "no bus to drain" in _tick(context)
    assert not EmbeddedNatsServer(tmp_path / "nats", port=port).running()


@pytest.mark.slow
def test_a_paper_replay_through_the_live_runner_lands_in_the_tables(nats, warehouse, tmp_path):
    """The real runner (in this process: warm-up from the warehouse, a registered LightGBM, the
    paper broker) trades a short replay; every message it published is a row, none refused, and
    the tables end where its engine ended."""
    from live.runner import run_runner
    from resources.registry import ModelRegistry
    from tests.live_support import BusClient, store_history, train_and_register
    from tests.natsserver import fresh_mlflow_store

    history, replay = 1520, 24
    bars = {s: make_bars(s, START, history + replay, seed=11 + i) for i, s in enumerate(SYMBOLS)}
    store_history(warehouse, pl.concat([b.head(history) for b in bars.values()]))
    uri = fresh_mlflow_store(tmp_path / "mlflow")
    version, _ = train_and_register(uri, "direction.M5.bridge", pl.concat([b.head(history) for b in bars.values()]))
    client = BusClient(nats.url)
    client.publish_bars(pl.concat([b.tail(replay) for b in bars.values()]))
    config = RunnerConfig(symbols=SYMBOLS, timeframe="M5", model="direction.M5.bridge@champion", name=RUNNER,
                          max_bar_age_s=0, risk=RiskConfig(risk_fraction=0.002), model_poll_s=0, heartbeat_s=1,
                          thresholds={"long_above": 0.5, "short_below": 0.5}, stop_when_idle_s=0.5)
    runners = []
    assert asyncio.run(run_runner(config, bus=NatsBus(nats.url), registry=ModelRegistry(uri), warehouse=warehouse,
                                  on_started=runners.append)) == 0
    engine = runners[0].engine
    published = {stream: client.messages(stream) for stream in ("SIGNALS", "ORDERS", "BROKER", "RISK", "PORTFOLIO")}
    client.close()

    result = asyncio.run(drain(NatsBus(nats.url), warehouse))
    assert not result.refused and result.messages == sum(len(m) for m in published.values())
    tables = _tables(warehouse)
    signals = tables["trading_signals"]
    assert signals.height == 2 * replay and set(signals["model_version"]) == {version} and set(signals["status"]) == {"signal"}
    assert sorted(tables["orders"].select("client_id", "seq").rows()) == sorted(
        (d["client_id"], d["seq"]) for _, d, _ in published["ORDERS"])
    assert len(published["ORDERS"]) > 0 and set(tables["orders"]["model_version"]) == {version}
    assert sorted(tables["executions"]["fill_id"]) == sorted(d["fill_id"] for _, d, _ in published["BROKER"])
    assert {f.fill_id for f in engine.fills} <= set(tables["executions"]["fill_id"])
    equity = tables["portfolio_value"]
    assert equity.height == 2 * replay and equity["equity"][-1] == engine.equity()
    account = sorted((d["bar_seq"], d["equity"], d["balance"], d["margin"]) for _, d, _ in published["PORTFOLIO"])
    assert equity.select("bar_seq", "equity", "balance", "margin").rows() == account
    assert engine.fills and equity["margin"].max() > 0
    assert equity["balance"][-1] == engine.portfolio.balance
    last = tables["positions"].filter(pl.col("bar_seq") == equity["bar_seq"][-1])
    assert dict(last.select("symbol", "units").rows()) == {s: p.units for s, p in engine.portfolio.positions.items() if p.units}
    assert tables["risk_events"].height == len(published["RISK"]) + sum(
        m.count(".") == 2 for m, _, _ in published["SIGNALS"]) + sum(m.startswith("broker.error.") for m, _, _ in published["BROKER"])


def test_the_ledger_streams_keep_duplicates_out_as_long_as_the_bars_do(monkeypatch):
    """A runner restarted up to two hours after a crash redoes the bar: its ledger messages (the
    same ids) must be stored once, so the ledger's duplicate window is the bars' 120 minutes,
    not JetStream's default 2, and configurable like it."""
    from datetime import timedelta

    from resources.bus.streams import bars_stream

    monkeypatch.delenv("TRADEFORGE_LEDGER_DEDUP_MINUTES", raising=False)
    monkeypatch.delenv("TRADEFORGE_LEDGER_RETENTION_DAYS", raising=False)
    specs = ledger_streams()
    assert [s.name for s in specs] == ["SIGNALS", "ORDERS", "BROKER", "RISK", "PORTFOLIO"]
    assert {s.duplicate_window for s in specs} == {timedelta(minutes=120)} == {bars_stream(30, 120).duplicate_window}
    monkeypatch.setenv("TRADEFORGE_LEDGER_DEDUP_MINUTES", "45")
    assert {s.duplicate_window for s in ledger_streams()} == {timedelta(minutes=45)}
    monkeypatch.setenv("TRADEFORGE_LEDGER_RETENTION_DAYS", "0.01")  # 14.4 minutes: the window cannot be longer
    assert {(s.max_age, s.duplicate_window) for s in ledger_streams()} == {(timedelta(days=0.01), timedelta(days=0.01))}
    monkeypatch.setenv("TRADEFORGE_LEDGER_DEDUP_MINUTES", "two hours")
    with pytest.raises(ValueError, match="TRADEFORGE_LEDGER_DEDUP_MINUTES"):
        ledger_streams()
