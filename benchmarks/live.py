"""The live runner's latency: a bar published on NATS -> its orders accepted by the paper
broker, p50 and p99 over 10,000 bars, with the per-stage breakdown, beside a NATS
request/reply round trip measured in the same run (the floor any bus hop pays).

Everything real: a private nats-server (JetStream on disk), the embedded warehouse for the
warm-up, MLflow's SQLite registry, a LightGBM of 500 trees, the runner in this process on
its own event loop. The publisher sends one bar at a time (the next once the runner has
finished the last: acknowledged, its ledger stored), stamping the send time in the
``Tradeforge-Sent-Ns`` header the runner reads; so each figure is one bar's own latency, with
no queue in front of it. Stages come from the runner's own timings (what it observes into its
Prometheus histograms, kept per bar here): bus (published -> received), features, inference
(the model and the strategy's signal; the model alone is timed apart), risk (the engine's step
without the broker), broker (time inside the paper broker); then what follows the accepted
order: the ledger to JetStream and the state to NATS KV.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

from live.config import RunnerConfig
from live.runner import SENT_HEADER, LiveRunner
from models.features.registry import WARMUP_BARS
from models.trading.risk import RiskConfig
from resources.bus import EmbeddedNatsServer, NatsBus
from resources.bus.messages import bar_msg_id, encode_bar
from resources.bus.streams import BARS_STREAM
from resources.registry import ModelRegistry
from resources.warehouse import WarehouseClient
from tests.live_support import BAR_MS, make_bars, replay_start, store_history, train_and_register
from tests.natsserver import free_port

TREES = 500
STAGES = ("bus", "features", "inference", "risk", "broker")


def _pct(values: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(values, dtype=float) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4), "n": int(ms.size)}


async def _request_reply(url: str, n: int) -> dict[str, float]:
    """Core NATS request/reply on the same server: a responder and a requester, two connections."""
    responder, requester = NatsBus(url), NatsBus(url)
    await responder.connect()
    await requester.connect()

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    sub = await responder.nc.subscribe("bench.echo", cb=echo)
    await responder.nc.flush()
    payload = b"x" * 300  # about a bar message's size
    times = []
    for _ in range(200):  # warm the path
        await requester.nc.request("bench.echo", payload, timeout=2)
    for _ in range(n):
        t0 = time.perf_counter()
        await requester.nc.request("bench.echo", payload, timeout=2)
        times.append(time.perf_counter() - t0)
    await sub.unsubscribe()
    await requester.close()
    await responder.close()
    return _pct(times)


def _model_alone(runner: LiveRunner, n: int = 3_000) -> dict[str, float]:
    """The served model's own call on one feature vector, as the runner makes it."""
    model = runner.model
    rows = np.random.default_rng(3).normal(size=(n, len(model.features))).astype(np.float32)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        model._predict(rows[i:i + 1])
        times.append(time.perf_counter() - t0)
    return _pct(times)


async def _drive(runner: LiveRunner, url: str, bars) -> None:
    """Publish each bar once the runner has finished the one before (closed loop)."""
    publisher = NatsBus(url)
    await publisher.connect()
    await publisher.ensure_stream(BARS_STREAM)
    await runner.start()
    task = asyncio.create_task(runner.run())
    try:
        for i, bar in enumerate(bars.iter_rows(named=True)):
            while len(runner.outcomes) < i and not task.done():
                await asyncio.sleep(0.0002)
            if task.done():
                break
            ts = int(bar["ts"].timestamp() * 1000)
            data = encode_bar({**bar, "ts": ts, "close_ts": ts + BAR_MS})
            await publisher.js.publish(f"bars.{bar['symbol']}.{bar['timeframe']}", data, timeout=5.0, headers={
                "Nats-Msg-Id": bar_msg_id(bar["symbol"], bar["timeframe"], ts), SENT_HEADER: str(time.time_ns())})
        while len(runner.outcomes) < bars.height and not task.done():
            await asyncio.sleep(0.001)
    finally:
        runner.request_stop()
        await task
        await publisher.close()


def bench_live(quick: bool = False) -> dict:
    n = 1_000 if quick else 10_000
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    print(f"live runner: {n:,} EURUSD M5 bars, bar published -> orders accepted by the paper broker, LightGBM {TREES} trees")
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        root = Path(tmp)
        server = EmbeddedNatsServer(root / "nats", port=free_port())
        server.start(detach=False)
        try:
            warehouse = WarehouseClient(embedded_path=str(root / "warehouse"), database=f"b_{uuid.uuid4().hex[:8]}")
            bars = make_bars("EURUSD", replay_start(0), WARMUP_BARS + n, seed=11)
            store_history(warehouse, bars.head(WARMUP_BARS))
            uri = f"sqlite:///{root / 'mlflow.db'}"
            t0 = time.perf_counter()
            train_and_register(uri, "bench.live", bars.head(WARMUP_BARS), trees=TREES)
            print(f"  model: LightGBM {TREES} trees (7 leaves), 15 features, registered in {time.perf_counter() - t0:.1f}s")
            config = RunnerConfig(symbols=("EURUSD",), timeframe="M5", model="bench.live@champion", name="bench",
                                  max_bar_age_s=0, model_poll_s=0, heartbeat_s=60,
                                  risk=RiskConfig(risk_fraction=0.002, max_daily_loss=None, max_drawdown=None),
                                  thresholds={"long_above": 0.5, "short_below": 0.5})
            runner = LiveRunner(config, bus=NatsBus(server.url, max_reconnect_attempts=-1), registry=ModelRegistry(uri),
                                warehouse=warehouse)
            stages: dict[str, list[float]] = defaultdict(list)
            observe = runner.metrics.observe

            def keep(stage: str, seconds: float) -> None:  # the histogram's value, kept per bar too
                stages[stage].append(seconds)
                observe(stage, seconds)

            runner.metrics.observe = keep  # type: ignore[method-assign]
            t0 = time.perf_counter()
            asyncio.run(_drive(runner, server.url, bars.tail(n)))
            wall = time.perf_counter() - t0
            outcomes = [o for o in runner.outcomes if o.status == "processed"]
            model_alone = _model_alone(runner)
            rr = asyncio.run(_request_reply(server.url, min(n, 10_000)))
        finally:
            server.stop()
    end_to_end = [o.accepted - o.sent for o in outcomes]
    with_orders = [o.accepted - o.sent for o in outcomes if o.orders]
    out = {
        "bars": len(outcomes), "bars_with_orders": len(with_orders), "trees": TREES, "seconds": round(wall, 1),
        "end_to_end": _pct(end_to_end), "end_to_end_bars_with_orders": _pct(with_orders),
        "stages": {s: _pct(stages[s]) for s in (*STAGES, "bar", "publish", "persist")},
        "model_alone": model_alone, "nats_request_reply": rr,
    }
    e2e = out["end_to_end"]
    print(f"  {len(outcomes):,} bars in {wall:.1f}s ({len(with_orders):,} placed orders)")
    print(f"  published -> orders accepted: p50 {e2e['p50_ms']:.3f} ms, p99 {e2e['p99_ms']:.3f} ms "
          f"(bars that placed orders: p50 {out['end_to_end_bars_with_orders']['p50_ms']:.3f}, "
          f"p99 {out['end_to_end_bars_with_orders']['p99_ms']:.3f} ms); goal p99 < 5 ms: "
          f"{'met' if e2e['p99_ms'] < 5 else 'NOT met'}")
    for stage in (*STAGES, "publish", "persist"):
        s = out["stages"][stage]
        after = " (after the order: the ledger to JetStream)" if stage == "publish" else \
            " (after the order: the state to NATS KV, then the ack)" if stage == "persist" else ""
        print(f"    {stage:<10} p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms{after}")
        if stage == "inference":
            print(f"      of which the model alone ({TREES} trees, one row): p50 {model_alone['p50_ms']:.3f} ms, "
                  f"p99 {model_alone['p99_ms']:.3f} ms (the rest: the feature vector and the strategy's signal)")
    print(f"  baseline, NATS request/reply round trip (same server, same run): p50 {rr['p50_ms']:.3f} ms, "
          f"p99 {rr['p99_ms']:.3f} ms; end-to-end p50 = {e2e['p50_ms'] / rr['p50_ms']:.1f}x a round trip")
    return out
