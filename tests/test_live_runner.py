"""The live runner on the real engines (a nats-server per test, the embedded warehouse, MLflow's
SQLite registry), in this process where a signal is not the point, so each test takes seconds:

- parity: two days replayed through the runner with the paper broker are the backtest's orders,
  fills and equity for those days (models/backtest, the same TradingEngine and configuration);
- bad input: malformed, incomplete, impossible (absurd values, crossed quotes), off-grid,
  future, out-of-order, duplicated and stale bars are refused with a reason, counted
  (Prometheus) and published (``risk.alert.bad_bar``), and the next good bar is processed; an
  unexpected error in one bar is refused the same way and the account rolled back; a broker
  that does not answer the check after an MT5 restart is asked again; a kill command written
  by hand that makes no sense is refused;
- hot swap: the alias moved mid-replay: no bar missed, each decision carries the version that
  made it; a version on another feature set is refused and the old one keeps serving;
- the kill switch: ``tradeforge live kill --flatten`` (KV) honoured at the next bar; the daily
  loss limit trips it by itself;
- SIGTERM mid-replay (``tradeforge live run`` in a process): exit 0, and a restart continues
  without a bar missed or done twice;
- Prometheus over HTTP; ``live/`` without dagster; the CLI's one-line failures.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from live.config import RunnerConfig
from live.parity import backtest_record, compare, report_lines, run_parity
from live.runner import LiveRunner
from models.backtest.runner import BacktestConfig, run_backtest
from models.trading.fills import FillConfig
from models.trading.risk import KillSwitch, RiskConfig
from models.trading.strategy import ModelStrategy
from orchestration.cli import main as cli
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.registry import ModelRegistry
from resources.warehouse import WarehouseClient
from tests.conftest import ROOT
from tests.live_support import (BAR_MS, BusClient, batch_predictions, make_bars, replay_start, store_history,
                                train_and_register)
from tests.natsserver import dead_url, free_port, fresh_mlflow_store

HISTORY = 1500  # = WARMUP_BARS: the runner's warm-up and the backtest see the same bars before the replay
DAYS = 2
REPLAY = DAYS * 288
MODEL = "direction.M5.live"
RISK = {"risk_fraction": 0.002, "max_daily_loss": None, "max_drawdown": None}
THRESHOLDS = {"long_above": 0.5, "short_below": 0.5}


@pytest.fixture(scope="module")
def world(warehouse_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-runner")
    warehouse = WarehouseClient(embedded_path=str(warehouse_dir), database=f"t_{uuid.uuid4().hex[:12]}", lock_timeout_s=60)
    bars = make_bars("EURUSD", replay_start(0), HISTORY + REPLAY, seed=5)
    store_history(warehouse, bars.head(HISTORY))
    uri = fresh_mlflow_store(root / "mlflow")
    _, model = train_and_register(uri, MODEL, bars.head(HISTORY))
    return {"root": root, "warehouse": warehouse, "bars": bars, "replay": bars.tail(REPLAY), "uri": uri, "model": model,
            "trade_from": bars["ts"][HISTORY]}


@pytest.fixture
def nats(tmp_path):
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    client = BusClient(server.url)
    yield server.url, client
    client.close()
    server.stop()


def config(name: str, **overrides) -> RunnerConfig:
    settings = {"symbols": ("EURUSD",), "timeframe": "M5", "model": f"{MODEL}@champion", "name": name, "max_bar_age_s": 0,
                "risk": RiskConfig(**{**RISK, **overrides.pop("risk", {})}), "thresholds": dict(THRESHOLDS),
                "model_poll_s": 0, "heartbeat_s": 0.2, **overrides}
    return RunnerConfig(**settings)


def new_runner(world, url: str, cfg: RunnerConfig) -> LiveRunner:
    return LiveRunner(cfg, bus=NatsBus(url, max_reconnect_attempts=-1), registry=ModelRegistry(world["uri"]),
                      warehouse=world["warehouse"])


async def process(runner: LiveRunner, count: int) -> list:
    """The next ``count`` bar messages, one at a time, as the runner's loop takes them."""
    out = []
    while len(out) < count:
        for msg in await runner._psub.fetch(batch=1, timeout=5):
            out.append(await runner.handle(msg))
    return out


def published(client: BusClient, stream: str, runner: str, subject: str = ">") -> list[dict]:
    return [d for _, d, _ in client.messages(stream, subject) if d.get("runner") == runner]


# -- parity ------------------------------------------------------------------------------------
def test_replaying_days_through_the_runner_with_the_paper_broker_is_the_backtest(world, nats):
    url, client = nats
    report, runner, outcomes, shared = asyncio.run(run_parity(
        config("parity"), world["replay"], bus_url=url, registry=ModelRegistry(world["uri"]), warehouse=world["warehouse"]))
    assert [o.status for o in outcomes] == ["processed"] * REPLAY

    # the referee: this test's own backtest (its own batch predictions of the model it trained)
    preds = batch_predictions(world["model"], world["bars"], world["trade_from"])
    strategy = ModelStrategy(column="prob_up", **THRESHOLDS)
    result = run_backtest(world["bars"], strategy, BacktestConfig(risk=RiskConfig(**RISK), fill=FillConfig()),
                          predictions=preds, name=runner.config.strategy, trade_from=world["trade_from"])
    assert type(result.engine) is type(runner.engine)
    live = report.live  # what the runner published on JetStream (ORDERS, BROKER, PORTFOLIO)

    # orders: the same client ids, sides, sizes, intents and bars, and the same final states
    theirs = result.orders.with_columns(pl.col("bar_ts").dt.epoch("ms"))
    assert len(live.orders) == theirs.height > 30
    for row in theirs.iter_rows(named=True):
        mine = live.orders[row["client_id"]]
        assert (mine["side"], mine["qty"], mine["intent"], mine["bar_ts"], mine["type"], mine["state"]) == \
               (row["side"], row["qty"], row["intent"], row["bar_ts"], row["type"], row["state"]), row["client_id"]
    # fills: price, size, commission and time, exactly
    expected = sorted((r["fill_id"], r["client_id"], r["qty"], r["price"], r["commission"], r["ts"])
                      for r in result.fills.with_columns(pl.col("ts").dt.epoch("ms")).iter_rows(named=True))
    assert live.fills == expected and len(live.fills) > 30
    # equity at every bar's close
    bt = dict(zip(result.equity["ts"].dt.epoch("ms").to_list(), result.equity["equity"].to_list()))
    assert len(live.equity) == len(bt) == REPLAY
    assert live.equity == bt  # to the bit: the same engine, the same floats
    assert live.final_equity == pytest.approx(runner.engine.equity(), abs=1e-9) and abs(live.final_equity - 100_000) > 10
    # one decision per bar, all by version 1
    signals = published(client, "SIGNALS", "parity", "signals.EURUSD")
    assert len(signals) == REPLAY and {s["model_version"] for s in signals} == {"1"}

    # the shared procedure (make demo's) agrees with the referee, and says so
    assert report.identical and report.bars == REPLAY
    assert backtest_record(shared) == backtest_record(result)
    lines = report_lines(report)
    assert lines[1].split()[-4:] == lines[2].split()[-4:] == [f"{len(live.orders):,}", str(live.entries),
                                                                f"{len(live.fills):,}", f"{bt[max(bt)]:,.2f}"]
    assert lines[3].startswith("  identical:") and f"all {REPLAY:,} bar closes" in lines[3]
    # and it finds a difference where there is one
    moved = backtest_record(result)
    moved.equity[max(moved.equity)] += 0.01
    assert compare(live, moved, REPLAY).difference.startswith("equity after the bar opening at")
    dropped = backtest_record(result)
    dropped.fills.pop()
    assert "fills live" in compare(live, dropped, REPLAY).difference


# -- bad input ---------------------------------------------------------------------------------
def test_bad_bars_are_refused_with_a_reason_counted_published_and_the_next_good_bar_is_processed(world, nats):
    url, client = nats
    good = world["replay"].head(40).with_columns(pl.col("ts").dt.epoch("ms").alias("ms")).to_dicts()
    for bar in good:
        bar["ts"] = bar.pop("ms")
    # the first 5 bars are stale when they arrive (closed longer ago than the limit), the rest fresh
    limit = time.time() - (good[5]["ts"] + BAR_MS) / 1000 + BAR_MS / 2000
    junk = 0

    def bad(payload: bytes, tag: str) -> None:
        nonlocal junk
        junk += 1
        client.publish_bar(good[0], msg_id=f"junk-{tag}", payload=payload)

    def encoded(bar: dict, **change) -> bytes:
        from resources.bus.messages import encode_bar

        return encode_bar({**bar, "close_ts": bar["ts"] + BAR_MS, **change})

    for i, bar in enumerate(good):
        if i == 20:
            continue  # published after 21: out of order
        client.publish_bar(bar)
        if i == 10:
            bad(b"{not json", "json")
            bad(json.dumps({"symbol": "EURUSD", "timeframe": "M5", "ts": bar["ts"]}).encode(), "fields")
            bad(encoded({**good[11]}, high=good[11]["low"] * 0.999), "high-low")
            bad(encoded({**good[11]}, low=-1.0), "negative")
            # wrong types and absurd values that once crashed the daemon, and bars the fill model must not see
            bad(encoded({**good[11]}, timeframe=["M5"]), "tf-list")
            bad(encoded({**good[11]}, ts=10**17, close_ts=10**17 + BAR_MS), "ts-huge")
            bad(encoded({**good[11]}, tick_count=10**20), "ticks-huge")
            bad(encoded({**good[11]}, bid_close=good[11]["ask_close"] + 0.0001), "crossed")
            bad(encoded({**good[11]}, bid_close=0.0), "bid-zero")
            bad(encoded({**good[11]}, ts=good[11]["ts"] + 60_000, close_ts=good[11]["ts"] + 60_000 + BAR_MS), "off-grid")
            bad(encoded({**good[11]}, close_ts=good[11]["ts"] + 2 * BAR_MS), "close-ts")
            # from the future: refused, so it cannot make every real bar after it look out of order
            future = (int(time.time() * 1000) // BAR_MS + 288) * BAR_MS
            bad(encoded({**good[11]}, ts=future, close_ts=future + BAR_MS), "future")
        if i == 21:
            client.publish_bar(good[20])  # older than the last processed
            client.publish_bar(good[21], msg_id="again-21")  # the same bar once more, under another id
    runner = new_runner(world, url, config("bad", max_bar_age_s=limit, metrics_port=0))

    async def go():
        await runner.start()
        try:
            return await process(runner, len(good) + junk + 1)
        finally:
            await runner.close()

    outcomes = asyncio.run(go())
    statuses = [o.status for o in outcomes]
    assert statuses[11:23] == ["malformed", "malformed", "impossible", "impossible", "malformed", "impossible",
                               "impossible", "impossible", "impossible", "off_grid", "impossible", "future"]
    assert statuses.count("out_of_order") == 1 and statuses.count("duplicate") == 1
    assert statuses[-1] == "processed" and statuses.count("processed") == len(good) - 1  # bar 20 came too late
    rejected = {s.labels["reason"]: s.value for m in runner.metrics.rejected.collect() for s in m.samples
                if s.name.endswith("_total")}
    expected = {"malformed": 3, "impossible": 7, "off_grid": 1, "future": 1, "out_of_order": 1, "duplicate": 1, "stale": 5}
    assert rejected == expected
    alerts = [d for d in published(client, "RISK", "bad", "risk.alert.bad_bar")]
    reasons = Counter(a["reason"].split(":")[0] for a in alerts)
    assert reasons == expected
    assert any("crossed" in a["reason"] for a in alerts) and any("after now" in a["reason"] for a in alerts)
    assert any("high" in a["reason"] for a in alerts) and any("not JSON" in a["reason"] for a in alerts)
    signals = published(client, "SIGNALS", "bad", "signals.EURUSD")
    assert [s["status"] for s in signals[:5]] == ["stale"] * 5 and signals[5]["status"] == "signal"  # no decision when stale
    assert len(signals) == len(good) - 1


def test_a_restart_rebuilds_the_feature_window_without_the_bars_it_refused(world, nats):
    """An off-grid bar refused while trading is not read back into the features by the restart's
    catch-up, nor refused again by it: after the restart every decision equals that of a runner
    that never stopped."""
    from resources.bus.messages import encode_bar

    url, client = nats
    bars = world["replay"].head(20).with_columns(pl.col("ts").dt.epoch("ms")).to_dicts()
    for i, bar in enumerate(bars):
        client.publish_bar(bar)
        if i == 9:
            ts = bar["ts"] + 60_000
            skewed = {**bar, "ts": ts, "close_ts": ts + BAR_MS, **{k: bar[k] * 1.01 for k in ("open", "high", "low", "close", "vwap")}}
            client.publish_bar(bar, msg_id="off-grid", payload=encode_bar(skewed))

    async def run(name: str, count: int) -> list:
        runner = new_runner(world, url, config(name))
        await runner.start()
        try:
            return await process(runner, count)
        finally:
            await runner.close()

    async def go():
        before = await run("regrid", 11)  # stopped right after refusing the off-grid bar
        between = await run("regrid", 1)  # the next bar, then stopped again
        after = await run("regrid", 9)  # this catch-up's window holds the off-grid bar
        reference = await run("regrid-ref", 21)
        return before, between, after, reference

    before, between, after, reference = asyncio.run(go())
    # refused once: a restart neither refuses (nor counts) it again, nor reads it into the window
    assert [o.status for o in before[-2:]] == ["processed", "off_grid"]
    assert [o.status for o in between] == ["processed"] and [o.status for o in after] == ["processed"] * 9
    assert [o.status for o in reference].count("off_grid") == 1
    mine = {s["ts"]: s["value"] for s in published(client, "SIGNALS", "regrid", "signals.EURUSD")}
    theirs = {s["ts"]: s["value"] for s in published(client, "SIGNALS", "regrid-ref", "signals.EURUSD")}
    assert len(mine) == len(theirs) == 20 and mine == theirs


def test_an_unexpected_error_in_one_bar_is_refused_counted_published_and_nothing_it_carried_is_lost(world, nats, monkeypatch):
    """The guard: a fault the checks cannot foresee (here the broker raising mid-step) is refused
    with the exception's text, the account rolled back to the last saved state, the message
    terminated, and the operator's command and the watcher's alert it carried are not lost."""
    url, client = nats
    client.publish_bars(world["replay"].head(30))
    runner = new_runner(world, url, config("guard"))
    monkeypatch.setenv("NATS_URL", url)

    def fault(*args, **kwargs):
        raise RuntimeError("boom in the broker")

    def model_fault(*args, **kwargs):
        raise KeyError("rsi_14")

    async def go():
        await runner.start()
        try:
            first = await process(runner, 10)
            runner.model.predict = model_fault  # a fault in the model: nothing moved yet, nothing to roll back
            model_failed = (await process(runner, 1))[0]
            del runner.model.predict
            first += await process(runner, 1)
            saved = runner.engine.snapshot()
            assert await asyncio.to_thread(cli, ["live", "kill", "--name", "guard", "--reduce-only", "--reason", "guard"]) == 0
            deadline = time.monotonic() + 5
            while runner.kill_command is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            runner._model_refused("9", "trained on feature set fs-x")  # what the watcher's thread reports
            broker = runner.timed.inner
            broker.advance = fault  # a fault in the broker, not in the runner
            failed = (await process(runner, 1))[0]
            del broker.advance
            rolled_back = runner.engine.snapshot() == saved
            kill_after_failure = runner.engine.kill
            rest = await process(runner, 17)
            return first, model_failed, failed, rolled_back, kill_after_failure, rest
        finally:
            await runner.close()

    first, model_failed, failed, rolled_back, kill_after_failure, rest = asyncio.run(go())
    assert model_failed.status == "error" and failed.status == "error" and rolled_back and kill_after_failure is KillSwitch.OFF
    assert [o.status for o in first + rest] == ["processed"] * 28  # the daemon went on
    assert runner.engine.kill is KillSwitch.REDUCE_ONLY and runner.engine.kill_reason == "guard"  # applied at the next bar
    rejected = {s.labels["reason"]: s.value for m in runner.metrics.rejected.collect() for s in m.samples
                if s.name.endswith("_total")}
    assert rejected == {"error": 2}
    alerts = published(client, "RISK", "guard", "risk.alert.>")
    errors = sorted((a["ts"], a["reason"]) for a in alerts if a["kind"] == "bad_bar")
    assert errors == [(model_failed.ts, "error: KeyError: 'rsi_14'"), (failed.ts, "error: RuntimeError: boom in the broker")]
    assert len([a for a in alerts if a["kind"] == "model_refused" and "fs-x" in a["reason"]]) == 1
    signals = published(client, "SIGNALS", "guard", "signals.EURUSD")
    assert not {failed.ts, model_failed.ts} & {s["ts"] for s in signals} and len(signals) == 28
    assert runner.state.last_seq == 30


def test_a_broker_that_does_not_answer_the_check_after_a_restart_is_asked_again_at_the_next_bar():
    """MT5 after a restart: the positions check after the first bar meets a terminal that does
    not answer (positions_get -> None, BrokerTimeout): an alert, no crash, the check at the next bar."""
    from models.market.instruments import instrument
    from models.trading.engine import EngineConfig, TradingEngine
    from models.trading.risk import RiskModel
    from resources.brokers.mt5 import constants as C
    from resources.brokers.mt5.broker import MT5Broker, MT5Config
    from resources.brokers.mt5.fake import FakeTerminal

    t0 = 1_709_546_400_000
    fake = FakeTerminal(margin_mode=C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING, commission_per_lot=7.0, start_ms=t0, server_utc_offset_s=0)
    fake.add_symbol("EURUSD")
    fake.initialize()
    fake.set_quote("EURUSD", 1.08500, 1.08502, t0)
    broker = MT5Broker(fake, MT5Config(magic=4242, symbols=("EURUSD",)), clock=fake.utc_now, sleep=lambda s: None)
    broker.connect()
    runner = LiveRunner(config("hiccup", broker="mt5"), bus=NatsBus("nats://127.0.0.1:1"), registry=None, warehouse=None)
    runner.broker = broker
    runner.engine = TradingEngine(EngineConfig("hiccup"), RiskModel(RiskConfig()), broker, {"EURUSD": instrument("EURUSD")})
    runner.claim_check = True
    fake.kill_ipc()
    messages = []
    runner._after_step(t0, "EURUSD", messages)
    assert runner.claim_check and runner.engine.kill is KillSwitch.OFF and not broker.halted
    assert [m.data["kind"] for m in messages] == ["broker_timeout"] and "asked again at the next bar" in messages[0].data["reason"]
    fake.restore_ipc()
    messages = []
    runner._after_step(t0 + BAR_MS, "EURUSD", messages)
    assert not runner.claim_check and messages == [] and runner.engine.kill is KillSwitch.OFF  # checked, and they agree


# -- hot swap ----------------------------------------------------------------------------------
def test_the_alias_moved_mid_replay_swaps_at_a_bar_boundary_and_another_feature_set_is_refused(world, nats):
    url, client = nats
    client.publish_bars(world["replay"].head(90))
    registry = ModelRegistry(world["uri"])
    runner = new_runner(world, url, config("swap", model=f"{MODEL}.swap@champion"))
    models = {"1": train_and_register(world["uri"], f"{MODEL}.swap", world["bars"].head(HISTORY), seed=1)[1]}

    async def go():
        await runner.start()
        try:
            first = await process(runner, 30)
            models["2"] = train_and_register(world["uri"], f"{MODEL}.swap", world["bars"].head(HISTORY), seed=2, trees=60)[1]
            runner.watcher.poll()  # what the watcher's thread does every model_poll_s
            second = await process(runner, 30)
            train_and_register(world["uri"], f"{MODEL}.swap", world["bars"].head(HISTORY), seed=3, feature_set="fs-other")
            runner.watcher.poll()
            third = await process(runner, 30)
            return first + second + third
        finally:
            await runner.close()

    outcomes = asyncio.run(go())
    assert [o.status for o in outcomes] == ["processed"] * 90
    assert registry.alias(f"{MODEL}.swap", "champion").version == "3"  # the alias points at the refused one
    signals = sorted(published(client, "SIGNALS", "swap", "signals.EURUSD"), key=lambda s: s["ts"])
    assert [s["ts"] for s in signals] == world["replay"]["ts"].dt.epoch("ms").head(90).to_list()  # no bar missed or doubled
    assert [s["model_version"] for s in signals] == ["1"] * 30 + ["2"] * 60
    # each bar's value is the prediction of the version it names, not of the other
    for version, other in (("1", "2"), ("2", "1")):
        mine = batch_predictions(models[version], world["bars"], world["trade_from"])
        theirs = batch_predictions(models[other], world["bars"], world["trade_from"])
        at = [s for s in signals if s["model_version"] == version]
        ours = dict(zip(mine["ts"].dt.epoch("ms").to_list(), mine["prob_up"].to_list()))
        not_ours = dict(zip(theirs["ts"].dt.epoch("ms").to_list(), theirs["prob_up"].to_list()))
        assert max(abs(s["value"] - ours[s["ts"]]) for s in at) < 1e-9
        assert sum(abs(s["value"] - not_ours[s["ts"]]) > 1e-6 for s in at) > len(at) // 2
    submitted = [d for d in published(client, "ORDERS", "swap") if d["status"] == "submitted"]
    assert {d["model_version"] for d in submitted if d["bar_ts"] < signals[30]["ts"]} == {"1"}
    assert {d["model_version"] for d in submitted if d["bar_ts"] >= signals[30]["ts"]} == {"2"}
    alerts = published(client, "RISK", "swap", "risk.alert.>")
    swap = [a for a in alerts if a["kind"] == "model_swap"]
    refused = [a for a in alerts if a["kind"] == "model_refused"]
    assert len(swap) == 1 and swap[0]["ts"] == signals[30]["ts"] and "v1" in swap[0]["reason"] and "v2" in swap[0]["reason"]
    assert len(refused) == 1 and "fs-other" in refused[0]["reason"] and refused[0]["model_version"] == "3"


# -- the kill switch ---------------------------------------------------------------------------
def test_live_kill_flatten_is_honoured_at_the_next_bar_and_the_daily_loss_limit_trips_it(world, nats, monkeypatch, capsys):
    url, client = nats
    client.publish_bars(world["replay"].head(120))
    runner = new_runner(world, url, config("kill"))
    monkeypatch.setenv("NATS_URL", url)

    async def go():
        await runner.start()
        try:
            done = await process(runner, 5)
            while not runner.engine.portfolio.position("EURUSD").units:
                done += await process(runner, 1)
            assert await asyncio.to_thread(cli, ["live", "kill", "--flatten", "--reason", "test"]) == 0
            deadline = time.monotonic() + 5
            while runner.kill_command is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the KV watch delivers it
            units = runner.engine.portfolio.position("EURUSD").units
            kill_bar = (await process(runner, 1))[0]
            after_kill = runner.engine.kill
            rest = await process(runner, 20)
            return done, units, kill_bar, after_kill, rest
        finally:
            await runner.close()

    done, units, kill_bar, after_kill, rest = asyncio.run(go())
    out = capsys.readouterr().out
    assert "runner kill: kill switch halt: no new orders, and every position closed" in out
    assert units and after_kill is KillSwitch.HALT and runner.engine.kill_reason == "test"
    orders = published(client, "ORDERS", "kill")
    flatten = [d for d in orders if d["intent"] == "flatten" and d["status"] == "submitted"]
    # decided between the last bar and the next (the engine's last bar names it), filled at the next open
    assert len(flatten) == 1 and flatten[0]["bar_ts"] == kill_bar.ts - BAR_MS and flatten[0]["qty"] == abs(units)
    assert not [d for d in orders if d["intent"] == "entry" and d["bar_ts"] >= kill_bar.ts]  # no new entries
    assert runner.engine.portfolio.position("EURUSD").units == 0  # closed at the next open
    assert [o.status for o in rest] == ["processed"] * 20  # bars keep coming in, nothing traded

    # `live status` shows it; `live kill --off` is the next revision
    assert cli(["live", "status"]) == 0
    status = capsys.readouterr().out
    assert "runner kill: stopped" in status and "kill switch: halt (test)" in status and "positions: flat" in status
    assert "model direction.M5.live v1 (@champion)" in status and f"{len(done) + 21:,} bars processed" in status
    assert f"external data as read at {datetime.fromtimestamp(runner.external_read_at / 1000, UTC):%Y-%m-%d %H:%M} UTC" in status
    assert cli(["live", "status", "--name", "kill", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["kill"]
    assert doc["state"]["kill"] == "halt" and doc["state"]["positions"] == {} and doc["state"]["bars"] == len(done) + 21
    assert doc["heartbeat"]["stopped"] and doc["heartbeat"]["limits"]["risk_fraction"] == 0.002

    # automatic: a daily loss limit a few trades reach
    client.publish_bars(world["replay"])
    auto = new_runner(world, url, config("auto", risk={"risk_fraction": 0.02, "max_daily_loss": 0.004}))

    async def go_auto():
        await auto.start()
        try:
            out = []
            while auto.engine.kill is KillSwitch.OFF and len(out) < REPLAY:
                out += await process(auto, 1)
            return out + await process(auto, 10)
        finally:
            await auto.close()

    outcomes = asyncio.run(go_auto())
    assert auto.engine.kill is KillSwitch.HALT and auto.engine.kill_reason.startswith("daily loss limit")
    tripped = outcomes[-11].ts
    alerts = published(client, "RISK", "auto", "risk.alert.limit")
    assert len(alerts) == 1 and alerts[0]["ts"] <= tripped and "daily loss limit" in alerts[0]["reason"]
    assert not [d for d in published(client, "ORDERS", "auto") if d["intent"] == "entry" and d["bar_ts"] > tripped]


def test_a_kill_command_written_by_hand_that_makes_no_sense_is_refused_and_the_switch_stays(world, nats, monkeypatch, caplog):
    """``nats kv put`` of non-JSON or an unknown mode, at start and while trading: one line, a
    ``risk.alert.kill_switch`` alert each, the switch as it was; the next good command works."""
    from live.state import CONTROL_BUCKET, kill_key

    url, client = nats
    client.publish_bars(world["replay"].head(30))
    runner = new_runner(world, url, config("handkill"))
    monkeypatch.setenv("NATS_URL", url)

    async def put(value: bytes) -> int:
        kv = await client.bus.key_value(CONTROL_BUCKET)
        return await kv.put(kill_key("handkill"), value)

    first = client.run(put(b"halt please"))

    async def go():
        await runner.start()
        try:
            done = await process(runner, 5)
            second = await asyncio.to_thread(client.run, put(b'{"mode": "explode", "flatten": true}'))
            deadline = time.monotonic() + 5
            while runner._kill_refused != second and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            done += await process(runner, 5)
            modes = runner.engine.kill
            assert await asyncio.to_thread(cli, ["live", "kill", "--name", "handkill", "--reason", "by the book"]) == 0
            deadline = time.monotonic() + 5
            while runner.kill_command is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            done += await process(runner, 1)
            return done, modes, second
        finally:
            await runner.close()

    done, modes, second = asyncio.run(go())
    assert [o.status for o in done] == ["processed"] * 11 and modes is KillSwitch.OFF
    assert runner.engine.kill is KillSwitch.HALT and runner.engine.kill_reason == "by the book"
    alerts = [a for a in published(client, "RISK", "handkill", "risk.alert.kill_switch") if "refused" in a["event_id"]]
    assert sorted(a["event_id"] for a in alerts) == [f"kill_switch:handkill:refused:{first}", f"kill_switch:handkill:refused:{second}"]
    assert any("not JSON" in a["reason"] for a in alerts) and any("'explode'" in a["reason"] for a in alerts)
    lines = [r.getMessage() for r in caplog.records if "is refused" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)


def test_live_kill_reduce_only_lets_exits_through_and_off_trades_again(world, nats, monkeypatch, capsys):
    url, client = nats
    client.publish_bars(world["replay"].head(150))
    runner = new_runner(world, url, config("ro"))
    monkeypatch.setenv("NATS_URL", url)

    async def kill(*flags: str) -> None:
        assert await asyncio.to_thread(cli, ["live", "kill", "--name", "ro", *flags]) == 0
        deadline = time.monotonic() + 5
        while runner.kill_command is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def go():
        await runner.start()
        try:
            await process(runner, 10)
            await kill("--reduce-only")
            reduce_from = (await process(runner, 1))[0].ts
            modes = [runner.engine.kill]
            await process(runner, 60)
            await kill("--off")
            off_from = (await process(runner, 1))[0].ts
            modes.append(runner.engine.kill)
            await process(runner, 60)
            return reduce_from, off_from, modes
        finally:
            await runner.close()

    reduce_from, off_from, modes = asyncio.run(go())
    assert "kill switch reduce only" in capsys.readouterr().out
    assert modes == [KillSwitch.REDUCE_ONLY, KillSwitch.OFF]
    submitted = [d for d in published(client, "ORDERS", "ro") if d["status"] == "submitted"]
    during = [d for d in submitted if reduce_from <= d["bar_ts"] < off_from]
    assert during and {d["intent"] for d in during} <= {"exit", "sl", "tp"}  # positions closed, none opened
    refused = [d for d in published(client, "SIGNALS", "ro", "signals.rejected.EURUSD") if reduce_from <= d["ts"] < off_from]
    assert refused and all("reduce" in d["reason"] for d in refused)
    assert [d for d in submitted if d["bar_ts"] >= off_from and d["intent"] == "entry"]  # trading again


# -- Prometheus --------------------------------------------------------------------------------
def test_the_prometheus_endpoint_counts_the_bars_and_times_every_stage(world, nats):
    from prometheus_client.parser import text_string_to_metric_families

    url, client = nats
    client.publish_bars(world["replay"].head(25))
    runner = new_runner(world, url, config("metrics", metrics_port=0))

    async def go():
        await runner.start()
        try:
            await process(runner, 25)
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{runner.metrics_port}/metrics", timeout=5).read().decode())
        finally:
            await runner.close()

    text = asyncio.run(go())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("tradeforge_live_bars_total", (("symbol", "EURUSD"),))] == 25
    for stage in ("features", "inference", "risk", "broker", "publish", "persist", "bar", "bus"):
        assert samples[("tradeforge_live_stage_seconds_count", (("stage", stage),))] == 25, stage
        assert samples[("tradeforge_live_stage_seconds_sum", (("stage", stage),))] > 0, stage
    assert samples[("tradeforge_live_equity", ())] == pytest.approx(runner.engine.equity())
    assert samples[("tradeforge_live_model_version", ())] == 1
    submitted = [d for d in published(client, "ORDERS", "metrics") if d["status"] == "submitted"]
    assert samples[("tradeforge_live_orders_total", (("status", "submitted"),))] == len(submitted) > 0


# -- SIGTERM, through the command line ---------------------------------------------------------
def test_sigterm_mid_replay_exits_0_and_a_restart_continues_without_a_bar_missed_or_repeated(world, nats, subprocess_env):
    url, client = nats
    env = {**subprocess_env, "NATS_URL": url, "MLFLOW_TRACKING_URI": world["uri"], "OMP_NUM_THREADS": "1",
           "TRADEFORGE_WAREHOUSE_PATH": world["warehouse"].embedded_path, "CLICKHOUSE_DATABASE": world["warehouse"].database}
    bars = world["replay"].head(200)
    command = [sys.executable, "-m", "orchestration.cli", "live", "run", "--symbols", "EURUSD", "--timeframe", "M5",
               "--model", f"{MODEL}@champion", "--name", "term", "--max-bar-age", "0", "--risk-fraction", "0.002",
               "--max-daily-loss", "0", "--max-drawdown", "0", "--long-above", "0.5", "--short-below", "0.5"]
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client.publish_bars(bars)
    state = client.wait_state("term", lambda s: s["bars"] >= 60, timeout=120, alive=lambda: first.poll() is None)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0 and "Traceback" not in err, err
    assert "trading; stop with SIGTERM" in out and "stopped:" in out
    stopped = client.state("term")["bars"]
    assert 60 <= stopped < 200
    second = subprocess.run([*command, "--stop-when-idle", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    final = client.state("term")
    assert final["bars"] == 200 and final["starts"] == 2
    seqs = sorted(d["bar_seq"] for d in published(client, "PORTFOLIO", "term"))
    assert seqs == list(range(1, 201))
    signals = Counter(d["ts"] for d in published(client, "SIGNALS", "term", "signals.EURUSD"))
    assert len(signals) == 200 and set(signals.values()) == {1}
    assert state["bars"] >= 60


# -- live/ without dagster ---------------------------------------------------------------------
def test_the_live_side_imports_without_dagster(subprocess_env):
    modules = ("live.runner", "live.model", "live.ledger", "live.state", "live.metrics", "live.config", "live.history",
               "live.replay", "live.collector", "live.broker_data", "live.publishing", "live.parity", "resources.brokers.paper",
               "resources.brokers.mt5.broker", "resources.brokers.mt5.remote")
    code = f"import sys\nimport {', '.join(modules)}\nassert 'dagster' not in sys.modules, 'dagster imported'\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


# -- the command line's one-line failures ------------------------------------------------------
def test_live_run_failures_are_one_line_on_stderr_and_exit_1(world, nats, monkeypatch, capsys):
    url, _ = nats
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.setenv("TRADEFORGE_WAREHOUSE_PATH", world["warehouse"].embedded_path)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", world["warehouse"].database)
    monkeypatch.setenv("NATS_URL", url)
    monkeypatch.delenv("TRADEFORGE_DEBUG", raising=False)
    train_and_register(world["uri"], f"{MODEL}.old", world["bars"].head(HISTORY), feature_set="fs-1999")
    base = ["live", "run", "--symbols", "EURUSD", "--timeframe", "M5", "--max-bar-age", "0"]

    def fails(argv: list[str]) -> str:
        assert cli(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tradeforge: ") and "Traceback" not in err, err
        return err

    assert "no registered model 'nope'" in fails([*base, "--model", "nope@champion"])
    err = fails([*base, "--model", f"{MODEL}.old@champion"])
    assert "trained on feature set fs-1999" in err and "retrain" in err
    assert "exists only for Windows" in fails([*base, "--model", f"{MODEL}@champion", "--broker", "mt5"])
    assert "no M5 bars of XAUUSD" in fails(["live", "run", "--symbols", "XAUUSD", "--model", f"{MODEL}@champion",
                                            "--name", "nohistory"])
    monkeypatch.setenv("NATS_URL", dead_url())
    assert "cannot reach NATS" in fails([*base, "--model", f"{MODEL}@champion"])
    assert "cannot reach NATS" in fails(["live", "status"])
    assert "cannot reach NATS" in fails(["live", "kill"])
    monkeypatch.setenv("NATS_URL", url)
    assert "no runner" in fails(["live", "status"])
    assert "no runner has saved its state" in fails(["live", "kill"])


# -- external data -----------------------------------------------------------------------------
def _gold(days: list, first_close: float) -> pl.DataFrame:
    """Daily gold closes as the commodity asset stores them (known at the next midnight UTC)."""
    return pl.DataFrame({
        "name": "gold", "ticker": "GC=F", "date": days, "open": 2000.0, "high": 2100.0, "low": 1900.0,
        "close": [first_close + 10.0 * i for i in range(len(days))], "volume": 1e5, "currency": "USD",
        "known_at": [datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(days=1) for d in days], "source": "test",
    }).with_columns(pl.col("known_at").cast(pl.Datetime("ms", "UTC")))


def test_new_external_rows_reach_a_running_runner_as_a_fresh_read_gives_them(world, nats, warehouse):
    """The runner reads the warehouse once; new FRED/commodity/calendar rows reach it through the
    ``external_update`` asset on ``market.external.update``: between two bars it holds what a fresh
    read gives (the features join exactly that), trading goes on, and an older read is ignored."""
    from dagster import materialize

    from assets.external import external_update
    from models.features.compute import external_features
    from resources.bus.external import ExternalUpdate
    from resources.bus.resource import BusResource
    from resources.warehouse.external import write_calendar_day, write_commodity_day
    from resources.warehouse.features import read_external

    url, client = nats
    now = datetime.now(UTC)
    start = datetime.fromtimestamp((int(now.timestamp() * 1000) // BAR_MS - HISTORY - 12) * BAR_MS / 1000, UTC)
    bars = make_bars("EURUSD", start, HISTORY + 12, seed=9)
    store_history(warehouse, bars.head(HISTORY))
    today = now.date()
    for day, frame in _gold([today - timedelta(days=k) for k in range(12, 3, -1)], 2000.0).partition_by("date", as_dict=True).items():
        write_commodity_day(warehouse, day[0], frame)
    runner = LiveRunner(config("external"), bus=NatsBus(url, max_reconnect_attempts=-1), registry=ModelRegistry(world["uri"]),
                        warehouse=warehouse)

    def fresh(close_ms: int) -> dict:
        with warehouse.session() as session:
            data = read_external(session, "EURUSD", start, datetime.now(UTC))
        return external_features(pl.Series([close_ms]).to_numpy(), data)

    def held(close_ms: int) -> dict:
        return external_features(pl.Series([close_ms]).to_numpy(), runner.external["EURUSD"])

    def same(a: dict, b: dict) -> bool:  # NaN (nothing known) equals NaN
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)

    async def go():
        await runner.start()
        client.publish_bars(bars.tail(12).head(4))
        assert [o.status for o in await process(runner, 4)] == ["processed"] * 4
        close = int(bars["ts"][-1].timestamp() * 1000) + BAR_MS
        read_at = runner.external_read_at
        # new rows land: three more gold closes (the last two known today) and a USD release this afternoon
        for day, frame in _gold([today - timedelta(days=k) for k in (3, 2, 1)], 2090.0).partition_by("date", as_dict=True).items():
            write_commodity_day(warehouse, day[0], frame)
        release = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(hours=36)
        write_calendar_day(warehouse, release.replace(hour=0), release.replace(hour=0) + timedelta(days=1), pl.DataFrame({
            "event_id": "nfp", "ts": release, "currency": "USD", "impact": "high", "title": "Payrolls", "actual": None,
            "forecast": 180.0, "previous": 150.0, "actual_text": "", "forecast_text": "180K", "previous_text": "150K",
            "known_at": now - timedelta(days=2), "source": "test"}, schema_overrides={"actual": pl.Float64}).with_columns(
                pl.col("ts", "known_at").cast(pl.Datetime("ms", "UTC"))))
        stale = held(close)
        assert not same(stale, fresh(close))  # what the runner read at its start is behind the warehouse now
        result = await asyncio.to_thread(materialize, [external_update],
                                         resources={"warehouse": warehouse, "bus": BusResource(url=url)})
        assert result.success
        meta = result.asset_materializations_for_node("external_update")[0].metadata
        assert meta["bus"].value == "published" and meta["events"].value == 1
        for _ in range(400):
            if runner.external_read_at > read_at:
                break
            await asyncio.sleep(0.01)
        assert runner.external_read_at > read_at
        now_held = held(close)
        assert same(now_held, fresh(close)) and not same(now_held, stale)
        assert now_held["commodity_gold_ret_1d"][0] == pytest.approx(2110.0 / 2100.0 - 1)  # the close known today
        assert now_held["event_hours_to_next"][0] == pytest.approx((release.timestamp() * 1000 - close) / 3_600_000)
        # an update read before what the runner holds changes nothing
        older = ExternalUpdate(datetime.fromtimestamp(read_at / 1000 - 60, UTC), start, now, pl.DataFrame(
            {"known_at": [now], "name": ["commodity_gold_ret_1d"], "value": [9.9]}).with_columns(
                pl.col("known_at").cast(pl.Datetime("ms", "UTC"))), pl.DataFrame(schema={
                    "ts": pl.Datetime("ms", "UTC"), "known_at": pl.Datetime("ms", "UTC"), "currency": pl.String,
                    "impact": pl.String, "actual": pl.Float64, "forecast": pl.Float64}))
        payload = older.encode()
        await runner.bus.js.publish("market.external.update", payload, headers={"Nats-Msg-Id": older.msg_id(payload)})
        await runner.bus.js.publish("market.external.update", b'{"read_at": "soon"}')  # refused, logged
        client.publish_bars(bars.tail(8))
        assert [o.status for o in await process(runner, 8)] == ["processed"] * 8  # trading went on
        assert same(held(close), now_held)
        await runner.close()

    asyncio.run(go())
    # no bus up (the embedded server not running): the asset says so and starts none
    result = materialize([external_update], resources={"warehouse": warehouse,
                                                       "bus": BusResource(embedded_port=free_port(), store_dir=str(world["root"] / "none"))})
    meta = result.asset_materializations_for_node("external_update")[0].metadata
    assert result.success and meta["bus"].value.startswith("no bus to publish on: NATS_URL is unset")


def test_the_external_update_is_retried_until_a_bus_that_was_down_answers(warehouse, tmp_path):
    """A bus that is configured but down when ``external_update`` runs (a NATS restart) fails the
    attempt with the reason and Dagster retries it: the update is published once the bus is back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from dagster import DagsterEventType, materialize

    from assets.external import external_update
    from resources.bus import BusError
    from resources.bus.resource import BusResource

    down = threading.Event()

    class WatchedBus(BusResource):
        """The real resource, telling the test when an attempt found no bus."""

        def publish_if_running(self, *args, **kwargs) -> str:
            try:
                return super().publish_if_running(*args, **kwargs)
            except BusError:
                down.set()
                raise

    async def stored() -> int:
        bus = NatsBus(server.url)
        await bus.connect()
        try:
            return (await bus.js.stream_info("EXTERNAL")).state.messages
        finally:
            await bus.close()

    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(materialize, [external_update],
                                  resources={"warehouse": warehouse, "bus": WatchedBus(url=server.url)})
            assert down.wait(60)  # the first attempt finds nothing listening ...
            server.start(detach=False)  # ... the retry (5 s later) the server back
            result = running.result(timeout=300)
        retries = [e for e in result.all_events if e.event_type is DagsterEventType.STEP_UP_FOR_RETRY]
        meta = result.asset_materializations_for_node("external_update")[0].metadata
        assert result.success and retries and meta["bus"].value == "published" and asyncio.run(stored()) == 1
        error, reasons = retries[0].event_specific_data.error, []
        while error is not None:  # the failure and its causes
            reasons.append(error.message)
            error = error.cause
        assert any("bus unreachable" in r and "keep the external data they hold" in r for r in reasons), reasons
    finally:
        server.stop()
