"""Parity of the live runner with the backtest, as a procedure: replay bars through a
:class:`~live.runner.LiveRunner` with the paper broker over NATS (the real path: the replay
publisher, the durable consumer, the ledger on JetStream), backtest the same model version on
the same bars with the same engine settings (:func:`models.backtest.runner.run_backtest`), and
compare orders, fills and equity.

The parity test (tests/test_live_runner.py) and ``make demo`` both run it. The backtest side
computes its features in batch (:func:`~models.features.compute.compute_features` over the
runner's warm-up bars plus the replayed ones) and asks the model row by row as the runner does;
a bar the runner cannot decide on (its window not warm yet) gets no prediction there either.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from live.config import RunnerConfig
from live.history import WarmUp, warm_up
from live.model import LiveModel
from live.replay import Replay
from live.runner import BarOutcome, LiveRunner
from models.backtest.runner import BacktestConfig, BacktestResult, run_backtest
from models.features.compute import compute_features
from models.features.registry import WARMUP_BARS
from models.trading.strategy import ModelStrategy
from resources.bus.client import NatsBus


@dataclass
class TradingRecord:
    """What one side did: orders by client id (as submitted, with the final state), fills and
    equity at each bar close (the last bar of each timestamp)."""

    orders: dict[str, dict] = field(default_factory=dict)  # client_id -> side qty intent bar_ts type state
    fills: list[tuple] = field(default_factory=list)  # (fill_id, client_id, qty, price, commission, ts), sorted
    equity: dict[int, float] = field(default_factory=dict)  # bar open (UTC ms) -> equity after it

    @property
    def entries(self) -> int:
        return sum(1 for o in self.orders.values() if o.get("intent") == "entry")

    @property
    def final_equity(self) -> float:
        return self.equity[max(self.equity)] if self.equity else math.nan


@dataclass
class ParityReport:
    live: TradingRecord
    backtest: TradingRecord
    bars: int  # bar messages the runner processed
    difference: str | None  # the first difference found; None: identical

    @property
    def identical(self) -> bool:
        return self.difference is None


# -- the live side -------------------------------------------------------------------------------
async def replay_through_runner(config: RunnerConfig, bars: pl.DataFrame, *, bus_url: str, registry: Any,
                                warehouse: Any, stall_s: float = 60.0) -> tuple[LiveRunner, list[BarOutcome], TradingRecord]:
    """Publish ``bars`` (as fast as the bus takes them) and run a fresh runner over them until
    it has handled every one (or none came for ``stall_s``); returns the runner (closed), what each message did and its ledger."""
    publisher = NatsBus(bus_url)
    await Replay(publisher, speed=None, resume=False, progress=lambda _: None).run([bars])
    runner = LiveRunner(config, bus=NatsBus(bus_url, max_reconnect_attempts=-1), registry=registry, warehouse=warehouse)
    try:
        await runner.start()
        task = asyncio.create_task(runner.run())
        seen, quiet = 0, 0.0
        while len(runner.outcomes) < bars.height and not task.done() and quiet < stall_s:
            await asyncio.sleep(0.005)
            quiet = 0.0 if len(runner.outcomes) > seen else quiet + 0.005
            seen = len(runner.outcomes)
        runner.request_stop()
        await task
    finally:
        await runner.close()
    outcomes = list(runner.outcomes)
    reader = NatsBus(bus_url)
    await reader.connect()
    try:
        record = await read_ledger(reader, config.name)
    finally:
        await reader.close()
    return runner, outcomes, record


async def stream_messages(bus: NatsBus, stream: str, subject: str = ">") -> list[tuple[str, dict]]:
    """Every message of ``stream`` on ``subject`` (an ephemeral consumer): (subject, payload)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    total = (await bus.js.stream_info(stream)).state.messages
    sub = await bus.js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=10.0))
    out: list[tuple[str, dict]] = []
    try:
        while len(out) < total:
            try:
                batch = await sub.fetch(500, timeout=0.5)
            except Exception:  # noqa: BLE001  (nats' TimeoutError: the subject holds no more)
                break
            out += [(m.subject, json.loads(m.data)) for m in batch]
    finally:
        await sub.unsubscribe()
    return out


async def read_ledger(bus: NatsBus, runner: str) -> TradingRecord:
    """The runner's orders, fills and equity as it published them to JetStream."""
    def mine(stream_messages_: list[tuple[str, dict]]) -> list[dict]:
        return [d for _, d in stream_messages_ if d.get("runner") == runner]

    orders = mine(await stream_messages(bus, "ORDERS"))
    record = TradingRecord()
    last_seq: dict[str, int] = {}
    for d in orders:
        cid = d["client_id"]
        if d["status"] == "submitted":
            record.orders.setdefault(cid, {}).update({k: d[k] for k in ("side", "qty", "intent", "bar_ts", "type")})
        if d["seq"] >= last_seq.get(cid, -1):
            last_seq[cid] = d["seq"]
            record.orders.setdefault(cid, {})["state"] = d["status"]
    record.fills = sorted((d["fill_id"], d["client_id"], d["qty"], d["price"], d["commission"], d["ts"])
                          for d in mine(await stream_messages(bus, "BROKER", "broker.fill.>")))
    for d in sorted(mine(await stream_messages(bus, "PORTFOLIO")), key=lambda d: d["bar_seq"]):
        record.equity[d["ts"]] = d["equity"]
    return record


# -- the backtest side ---------------------------------------------------------------------------
def runner_predictions(model: LiveModel, config: RunnerConfig, history: WarmUp, bars: pl.DataFrame) -> pl.DataFrame:
    """The model's value for each bar of ``bars`` from batch features over the warm-up plus
    those bars, asked one row at a time like the runner; null where the runner's window is not
    warm yet (fewer than WARMUP_BARS bars seen)."""
    frames = []
    for symbol in config.symbols:
        mine = bars.filter(pl.col("symbol") == symbol).sort("ts")
        if mine.is_empty():
            continue
        seen = history.bars[symbol].height
        full = pl.concat([history.bars[symbol], mine.select(history.bars[symbol].columns)])
        feats = compute_features(full, config.timeframe, config.day_boundary, history.external.get(symbol)).tail(mine.height)
        values = [model.predict(row) if seen + i + 1 >= WARMUP_BARS else None
                  for i, row in enumerate(feats.iter_rows(named=True))]
        frames.append(feats.select("symbol", "timeframe", "ts", "close_ts")
                      .with_columns(pl.Series(model.column, values, dtype=pl.Float64)))
    out = pl.concat(frames)
    other = "prediction" if model.column == "prob_up" else "prob_up"
    return out.with_columns(pl.lit(None, dtype=pl.Float64).alias(other))


def backtest_same_bars(model: LiveModel, config: RunnerConfig, history: WarmUp, bars: pl.DataFrame) -> BacktestResult:
    """The backtest of ``model`` on the runner's warm-up bars plus ``bars``, deciding from the
    first of ``bars`` on, with the runner's equity, risk, costs, thresholds and strategy name."""
    warm = pl.concat([history.bars[s] for s in config.symbols if history.bars[s].height])
    every = pl.concat([warm, bars.select(warm.columns)])
    strategy = ModelStrategy(column=model.column, **{k: v for k, v in config.thresholds.items() if k != "column"})
    settings = BacktestConfig(initial_equity=config.initial_equity, account_currency=config.account_currency,
                              risk=config.risk, fill=config.fill)
    return run_backtest(every, strategy, settings, predictions=runner_predictions(model, config, history, bars),
                        name=config.strategy, trade_from=bars["ts"].min())


def backtest_record(result: BacktestResult) -> TradingRecord:
    orders = result.orders.with_columns(pl.col("bar_ts").dt.epoch("ms"))
    fills = result.fills.with_columns(pl.col("ts").dt.epoch("ms"))
    return TradingRecord(
        orders={r["client_id"]: {"side": r["side"], "qty": r["qty"], "intent": r["intent"], "bar_ts": r["bar_ts"],
                                 "type": r["type"], "state": r["state"]} for r in orders.iter_rows(named=True)},
        fills=sorted((r["fill_id"], r["client_id"], r["qty"], r["price"], r["commission"], r["ts"]) for r in fills.iter_rows(named=True)),
        equity=dict(zip(result.equity["ts"].dt.epoch("ms").to_list(), result.equity["equity"].to_list(), strict=True)),
    )


# -- the comparison ------------------------------------------------------------------------------
def first_difference(live: TradingRecord, backtest: TradingRecord) -> str | None:
    """The first way the two records differ (orders, then fills, then equity), in words."""
    for cid in sorted(set(live.orders) | set(backtest.orders)):
        a, b = live.orders.get(cid), backtest.orders.get(cid)
        if a != b:
            return f"order {cid}: live {_short(a)}, backtest {_short(b)}"
    for a, b in zip(live.fills, backtest.fills):
        if a != b:
            return f"fill {a[0]}: live {a[1:]}, backtest {b[1:]}"
    if len(live.fills) != len(backtest.fills):
        return f"{len(live.fills)} fills live, {len(backtest.fills)} in the backtest"
    if set(live.equity) != set(backtest.equity):
        only = sorted(set(live.equity) ^ set(backtest.equity))
        return f"equity at {len(only)} bar(s) on one side only (first: {only[0]} ms)"
    for ts in sorted(live.equity):
        if live.equity[ts] != backtest.equity[ts]:
            return f"equity after the bar opening at {ts} ms: live {live.equity[ts]!r}, backtest {backtest.equity[ts]!r}"
    return None


def compare(live: TradingRecord, backtest: TradingRecord, bars: int) -> ParityReport:
    return ParityReport(live, backtest, bars, first_difference(live, backtest))


def report_lines(report: ParityReport) -> list[str]:
    """A small table (orders, entries, fills, final equity of each side) and the verdict."""
    rows = [("live runner", report.live), ("backtest", report.backtest)]
    lines = [f"  {'':<12} {'orders':>7} {'entries':>8} {'fills':>7} {'final equity':>14}"]
    lines += [f"  {name:<12} {len(r.orders):>7,} {r.entries:>8,} {len(r.fills):>7,} {r.final_equity:>14,.2f}" for name, r in rows]
    if report.identical:
        lines.append(f"  identical: every order (side, size, intent, bar, final state), every fill (price, size, commission, "
                     f"time) and the equity at all {len(report.live.equity):,} bar closes")
    else:
        lines.append(f"  DIFFERENT: {report.difference}")
    return lines


async def run_parity(config: RunnerConfig, bars: pl.DataFrame, *, bus_url: str, registry: Any,
                     warehouse: Any) -> tuple[ParityReport, LiveRunner, list[BarOutcome], BacktestResult]:
    """Both sides on ``bars`` (the runner reads its warm-up from ``warehouse`` before the first
    of them; set ``config.history_end`` to it) and their comparison."""
    runner, outcomes, live = await replay_through_runner(config, bars, bus_url=bus_url, registry=registry, warehouse=warehouse)
    before = {s: config.history_end for s in config.symbols}
    history = await asyncio.to_thread(warm_up, warehouse, config.symbols, config.timeframe, before)
    result = backtest_same_bars(runner.model, config, history, bars)
    processed = sum(1 for o in outcomes if o.status == "processed")
    return compare(live, backtest_record(result), processed), runner, outcomes, result


def _short(order: Mapping[str, Any] | None) -> str:
    return "none" if order is None else " ".join(f"{k}={v}" for k, v in order.items())
