"""Crash-only, on the real engines (a nats-server, MLflow's SQLite registry, the embedded
warehouse) and the real runner in processes forked from a server (tests/live_worker.py):

- kill -9 the runner at a dozen random moments of a 300-bar replay (two symbols, paper broker)
  and restart it each time: no order placed twice, no bar missed or done twice, and the final
  positions, balance, equity and every order and fill equal an uninterrupted run's;
- the same with the MetaTrader 5 broker on the fake terminal, which runs in a process of its
  own (its account outlives the runner, as a real terminal's does);
- SIGTERM finishes the bar and exits 0;
- the NATS server restarted in the middle of a live replay: no bar lost or doubled.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from resources.warehouse import WarehouseClient
from tests.conftest import ROOT
from tests.live_support import BAR_MS, BusClient, make_bars, replay_start, store_history, train_and_register
from resources.bus import EmbeddedNatsServer
from tests.natsserver import free_port, fresh_mlflow_store

HISTORY, REPLAY = 1600, 150
SYMBOLS = ("EURUSD", "XAUUSD")
MODEL = "direction.M5.crash"
KILLS = 12
RISK = {"max_daily_loss": None, "max_drawdown": None, "risk_fraction": 0.002}
THRESHOLDS = {"long_above": 0.5, "short_below": 0.5}


class ForkServer:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.logs = logs
        self.process = subprocess.Popen([sys.executable, "-m", "tests.live_worker"], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def ready(self) -> None:
        assert self.process.stdout.readline().strip() == "ready"

    def start(self, setup: dict, nats: str, **settings) -> int:
        command = {**setup, "nats": nats, "run": {**setup["run"], **settings},
                   "log": str(self.logs / f"{settings.get('name', 'runner')}.log")}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline().strip()
        assert line.startswith("child "), line
        return int(line.split()[1])

    def close(self) -> None:
        self.process.stdin.write('{"quit": true}\n')
        self.process.stdin.flush()
        self.process.wait(timeout=30)


def child_env() -> dict[str, str]:
    """This checkout importable, no stray configuration (conftest's subprocess_env, module-wide)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLICKHOUSE_", "DAGSTER_PG_", "TRADEFORGE_", "MLFLOW_", "NATS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not alive(pid), f"runner {pid} did not exit"


class Nats:
    """A nats-server of a test's own (so a test can restart it), with a client."""

    def __init__(self, root: Path) -> None:
        self.server = EmbeddedNatsServer(root, port=free_port())
        self.server.start(detach=False)
        self.url = self.server.url
        self.client = BusClient(self.url)

    def restart(self) -> None:
        self.server.stop()
        self.server.start(detach=False)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def env(warehouse_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    server = ForkServer(child_env(), root)  # imports in the background while the rest is set up
    warehouse = WarehouseClient(embedded_path=str(warehouse_dir), database=f"t_{uuid.uuid4().hex[:12]}", lock_timeout_s=60)
    bars = {s: make_bars(s, replay_start(0), HISTORY + REPLAY, seed=11 + i) for i, s in enumerate(SYMBOLS)}
    history = pl.concat([b.head(HISTORY) for b in bars.values()])
    store_history(warehouse, history)
    uri = fresh_mlflow_store(root / "mlflow")
    train_and_register(uri, MODEL, history)
    server.ready()
    setup = {"mlflow": uri, "warehouse": [str(warehouse_dir), warehouse.database],
             "run": {"symbols": list(SYMBOLS), "timeframe": "M5", "model": f"{MODEL}@champion", "strategy": "crash",
                     "max_bar_age_s": 0, "risk": RISK, "thresholds": THRESHOLDS, "model_poll_s": 0, "heartbeat_s": 1}}
    yield {"server": server, "setup": setup, "bars": bars, "root": root, "uri": uri, "warehouse": warehouse}
    server.close()


@pytest.fixture
def nats(tmp_path):
    bus = Nats(tmp_path / "nats")
    yield bus
    bus.close()


def run_to_end(env: dict, nats: Nats, name: str, total: int, **settings) -> dict:
    pid = env["server"].start(env["setup"], nats.url, name=name, stop_when_idle_s=1.0, **settings)
    state = nats.client.wait_state(name, lambda s: s["bars"] >= total, timeout=90, alive=lambda: alive(pid))
    wait_dead(pid)
    return state


def ledger(client: BusClient, runner: str) -> dict:
    """What the runner published, per stream, as (msg id without the runner's name, payload);
    the broker's fills under BROKER, what it refused or left unanswered under BROKER_ERRORS."""
    out = {}
    for stream in ("ORDERS", "BROKER", "PORTFOLIO", "SIGNALS"):
        rows = [(subject, mid.replace(f":{runner}:", ":"), {k: v for k, v in data.items() if k != "runner"})
                for subject, data, mid in client.messages(stream) if data.get("runner") == runner]
        if stream == "BROKER":
            out["BROKER_ERRORS"] = [(mid, data) for subject, mid, data in rows if subject.startswith("broker.error.")]
            rows = [row for row in rows if row[0].startswith("broker.fill.")]
        out[stream] = [(mid, data) for _, mid, data in rows]
    return out


def account(state: dict) -> dict:
    engine = state["engine"]
    return {"positions": {s: u for s, (u, _) in engine["portfolio"]["positions"].items() if u},
            "balance": engine["portfolio"]["balance"], "last_ts": state["last_ts"], "bars": state["bars"],
            "working": sorted(o["client_id"] for o in engine["orders"] if o["state"] not in
                              ("filled", "cancelled", "rejected", "expired"))}


def publish_slowly(client: BusClient, bars: pl.DataFrame, every_s: float) -> threading.Thread:
    """A live feed: one bar every ``every_s``, each retried until the stream has it (through a server restart)."""
    def feed() -> None:
        for bar in bars.sort("ts", "symbol").iter_rows(named=True):
            while True:
                try:
                    client.publish_bar(bar)
                    break
                except Exception:  # noqa: BLE001  (the server is restarting)
                    time.sleep(0.05)
            time.sleep(every_s)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_kill_9_at_random_moments_of_a_replay_then_restart_equals_an_uninterrupted_run(env, nats):
    client, total = nats.client, len(SYMBOLS) * REPLAY
    # The uninterrupted run takes the bars as a live feed publishes them, and rides out a restart
    # of the NATS server in the middle: no bar lost (the crashed run below, which reads the complete
    # stream, would then differ from it) and none done twice (one account per bar, below).
    pid = env["server"].start(env["setup"], nats.url, name="reference", stop_when_idle_s=3.0)
    client.wait_state("reference", lambda s: True, timeout=60, alive=lambda: alive(pid))  # started
    feed = publish_slowly(client, pl.concat([b.tail(REPLAY) for b in env["bars"].values()]), 0.01)
    client.wait_state("reference", lambda s: s["bars"] >= total // 3, timeout=60, alive=lambda: alive(pid))
    nats.restart()
    reference = client.wait_state("reference", lambda s: s["bars"] >= total, timeout=60, alive=lambda: alive(pid))
    feed.join(10)
    wait_dead(pid)
    log = (env["root"] / "reference.log").read_text()
    assert "reconnected; consuming from bar message" in log and "runner failed" not in log
    rng = random.Random(20241124)
    progress, starts, phases = [], 0, Counter()
    for kill in range(KILLS):
        pid = env["server"].start(env["setup"], nats.url, name="crashed")
        starts += 1
        before = (client.state("crashed") or {"bars": 0})["bars"]
        if kill % 4 == 0:
            time.sleep(rng.uniform(0.0, 0.8))  # somewhere in the start: loading, reconciling, warming up
            phases["start"] += 1
        else:
            target = min(total - 5, before + rng.randint(3, 40))
            client.wait_state("crashed", lambda s, t=target: s["bars"] >= t, timeout=60, alive=lambda: alive(pid))
            time.sleep(rng.uniform(0.0, 0.004))  # somewhere in a bar: features, engine, ledger, save, ack
            phases["bars"] += 1
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        progress.append((client.state("crashed") or {"bars": 0})["bars"])
    # SIGTERM: the bar in hand is finished, the runner exits by itself
    pid = env["server"].start(env["setup"], nats.url, name="crashed")
    client.wait_state("crashed", lambda s: s["bars"] >= progress[-1] + 2, timeout=60, alive=lambda: alive(pid))
    os.kill(pid, signal.SIGTERM)
    wait_dead(pid, timeout=10)
    assert "runner failed" not in (env["root"] / "crashed.log").read_text()
    final = run_to_end(env, nats, "crashed", total)

    assert phases["bars"] >= 8 and len(set(progress)) >= 8, progress  # kills landed all along the replay
    assert progress == sorted(progress) and progress[-1] < total
    assert account(final) == account(reference)
    assert final["engine"]["portfolio"]["positions"] == reference["engine"]["portfolio"]["positions"]
    assert final["broker"]["positions"] == reference["broker"]["positions"]
    mine, theirs = ledger(client, "crashed"), ledger(client, "reference")
    assert sorted(d["bar_seq"] for _, d in theirs["PORTFOLIO"]) == list(range(1, total + 1))
    for stream in ("ORDERS", "BROKER", "PORTFOLIO"):
        ids = [mid for mid, _ in mine[stream]]
        assert len(ids) == len(set(ids)), f"{stream}: a message stored twice"
        assert sorted(mine[stream], key=lambda r: r[0]) == sorted(theirs[stream], key=lambda r: r[0]), stream
    placed = Counter(d["client_id"] for _, d in mine["ORDERS"] if d["status"] == "submitted")
    assert placed and max(placed.values()) == 1  # every order placed once
    assert len(placed) > 20 and len(mine["BROKER"]) > 10  # the replay traded
    bars_done = [d["bar_seq"] for _, d in mine["PORTFOLIO"]]
    assert sorted(bars_done) == list(range(1, total + 1))  # every bar once, none missed
    signals = Counter((d["symbol"], d["ts"]) for mid, d in mine["SIGNALS"] if mid.startswith("sig:"))
    assert len(signals) == total and set(signals.values()) == {1}
    assert phases["bars"] + 2 <= final["starts"] <= starts + 2  # a kill before the first save leaves no trace


# -- MetaTrader 5 on the fake terminal, in a process of its own ------------------------------------
MT5_BARS = 120
HALF = 0.00002  # EURUSD's half spread in make_bars


@pytest.fixture(scope="module")
def terminals(env):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "resources.brokers.mt5.remote", "--port", str(port)], env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().startswith("fake MetaTrader 5 terminals on")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def fake_terminal(address: str, name: str, first: dict):
    from resources.brokers.mt5 import constants as C
    from resources.brokers.mt5.remote import connect

    terminal = connect(f"{address}/{name}", {"margin_mode": C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING, "commission_per_lot": 7.0,
                                             "start_ms": first["ts"] - 60_000, "server_utc_offset_s": 0})
    terminal.add_symbol("EURUSD")
    terminal.initialize()
    terminal.set_quote("EURUSD", first["open"] - HALF, first["open"] + HALF, first["ts"] - 60_000)
    return terminal


def drive_mt5(env: dict, nats: Nats, terminal, address: str, name: str, bars: list[dict], kills: dict[int, str] | None = None,
              late: int | None = None, seed: int = 0) -> tuple[dict, int]:
    """The market and the bars in lockstep with the runner: the fake walks bar i, its close is the
    next bar's first quote, the bar is published, and bar i+1 waits until the runner saved bar i
    (a real market would not wait; equality with the reference needs it). At the bars in
    ``kills`` the runner is killed -9 and started again: ``"random"`` somewhere in the bar,
    ``"sent"`` the moment the bar's first order reaches the terminal (before the runner saved
    the bar: the restart must find the order and not send it again)."""
    rng = random.Random(seed)
    kills = kills or {}
    settings = {"name": name, "broker": "mt5", "mt5_fake": f"{address}/{name}", "symbols": ["EURUSD"],
                "stop_when_idle_s": 2.0}
    pid, starts = env["server"].start(env["setup"], nats.url, **settings), 1
    for i, bar in enumerate(bars):
        terminal.run_bar("EURUSD", bar["ts"], bar["open"], bar["high"], bar["low"], bar["close"], HALF, BAR_MS)
        terminal.set_quote("EURUSD", bar["close"] - HALF, bar["close"] + HALF, bar["ts"] + BAR_MS)
        if i == late:
            terminal.execute_late()  # the answer to the bar's first request is lost; it executes at the next quote
        sent = len(terminal.sent())
        nats.client.publish_bar(bar)
        if i in kills:
            if kills[i] == "sent":
                deadline = time.monotonic() + 20
                while len(terminal.sent()) == sent and time.monotonic() < deadline:
                    pass
                assert len(terminal.sent()) > sent, f"bar {i} sent no order"
            else:
                time.sleep(rng.uniform(0.0, 0.012))
            os.kill(pid, signal.SIGKILL)
            wait_dead(pid)
            pid, starts = env["server"].start(env["setup"], nats.url, **settings), starts + 1
        nats.client.wait_state(name, lambda s, n=i + 1: s["bars"] >= n, timeout=60, alive=lambda: alive(pid))
    wait_dead(pid)
    return nats.client.state(name), starts


@pytest.mark.slow
def test_the_same_with_mt5_on_a_fake_terminal_that_outlives_the_runner_and_an_unanswered_order(env, nats, terminals, tmp_path):
    frame = env["bars"]["EURUSD"].tail(REPLAY).head(MT5_BARS)
    bars = frame.with_columns(pl.col("ts").dt.epoch("ms")).to_dicts()
    reference_terminal = fake_terminal(terminals, "mt5-reference", bars[0])
    reference, _ = drive_mt5(env, nats, reference_terminal, terminals, "mt5-reference", bars)
    theirs = ledger(nats.client, "mt5-reference")
    entries = [d for _, d in theirs["ORDERS"] if d["status"] == "submitted" and d["intent"] == "entry"]
    assert len(entries) > 5
    # the answer to an entry in the middle is lost (one the bar sends alone: the fake delays the
    # bar's first request): the order stays unknown until the broker is asked
    sent_at = Counter(d["bar_ts"] for _, d in theirs["ORDERS"] if d["status"] == "submitted" and d["parent_id"] is None)
    unanswered = next(d for d in entries if (d["bar_ts"] - bars[0]["ts"]) // BAR_MS > MT5_BARS // 3 and sent_at[d["bar_ts"]] == 1)
    late = (unanswered["bar_ts"] - bars[0]["ts"]) // BAR_MS
    rng = random.Random(7)
    sending = sorted({(d["bar_ts"] - bars[0]["ts"]) // BAR_MS for _, d in theirs["ORDERS"] if d["status"] == "submitted"
                      and d["parent_id"] is None} - set(range(late - 2, late + 3)))
    kills = dict.fromkeys(rng.sample(sending, 5), "sent")
    kills |= dict.fromkeys(rng.sample([i for i in range(3, MT5_BARS - 3) if abs(i - late) > 2 and i not in kills], 5), "random")
    terminal = fake_terminal(terminals, "mt5-crashed", bars[0])
    # A bus of its own: on the first one the bars are stored already (the same message ids), and the
    # runner would read them all at once, ahead of the market the terminal walks.
    bus = Nats(tmp_path / "nats-crashed")
    try:
        final, starts = drive_mt5(env, bus, terminal, terminals, "mt5-crashed", bars, kills, late, seed=3)
        mine = ledger(bus.client, "mt5-crashed")
    finally:
        bus.close()

    assert starts == len(kills) + 1
    assert account(final) == account(reference)
    assert account(final)["positions"] or account(final)["working"] or len(mine["BROKER"]) > 10  # it traded
    ours, theirs_at_broker = terminal.state(), reference_terminal.state()
    assert ours["positions"] == theirs_at_broker["positions"] and ours["orders"] == theirs_at_broker["orders"]
    assert ours["balance"] == pytest.approx(theirs_at_broker["balance"], abs=1e-9)
    assert ours["deals"] == theirs_at_broker["deals"]
    sent = Counter(comment for comment, *_ in terminal.sent())
    assert sent and max(sent.values()) == 1  # no order sent twice: kills and the lost answer included
    assert sent == Counter(comment for comment, *_ in reference_terminal.sent())
    assert sorted(mine["BROKER"], key=lambda r: r[0]) == sorted(theirs["BROKER"], key=lambda r: r[0])  # the same fills
    path = [d["status"] for _, d in sorted(mine["ORDERS"], key=lambda r: r[1]["seq"]) if d["client_id"] == unanswered["client_id"]]
    assert path[:2] == ["submitted", "unknown"] and "filled" in path, path  # unknown until asked, then found filled
    assert [d["client_id"] for _, d in mine["BROKER_ERRORS"]] == [unanswered["client_id"]]  # its missing answer, published
    assert "no answer" in mine["BROKER_ERRORS"][0][1]["reason"] and not theirs["BROKER_ERRORS"]
    assert sorted(d["bar_seq"] for _, d in mine["PORTFOLIO"]) == list(range(1, MT5_BARS + 1))  # every bar once
    log = (env["root"] / "mt5-crashed.log").read_text()
    assert "runner failed" not in log and "halted" not in log and log.count("forked") == starts
    # the kills at a send landed between the order and the save: the restart found it and the replay claimed it
    assert log.count("tradeforge.live mt5-crashed: reconciled") == len(kills)
    assert sum("awaiting the replay" in line for line in log.splitlines() if "tradeforge.live" in line) >= 3
