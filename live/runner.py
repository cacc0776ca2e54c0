"""The live runner: NATS bars in, the backtest's engine, orders out, crash-only.

Per bar message (``bars.{SYM}.{TF}`` on the JetStream stream ``BARS``, one durable consumer
over the runner's symbols, in stream order, one message in flight):

1. decode and check it (:func:`resources.bus.messages.decode_bar`): malformed, impossible,
   on the wrong subject, off the timeframe's grid, closing in the future (beyond
   ``max_clock_skew_s`` on the runner's clock), a duplicate or out of order -> refused with the
   reason (counted, published on ``risk.alert.bad_bar``), acknowledged, and the runner goes on;
   any other exception while handling it is refused the same way (reason ``error``, with the
   exception's text) and the message terminated (see :meth:`LiveRunner.handle`);
2. the feature row (:class:`~models.features.online.RollingFeatures`); then what the operator
   asked since the last bar (the kill switch) and a model the alias moved to (loaded meanwhile
   on the watcher's thread);
3. the model's prediction, the model strategy's signal: no decision while the window warms up or
   when the bar is stale;
4. ``engine.on_bar``: the same :class:`~models.trading.engine.TradingEngine` as the backtests,
   through the paper broker or the MT5 broker;
5. the ledger to JetStream (signals, decisions, order transitions, fills, alerts, the account),
   all with deterministic message ids, then the state to NATS KV (one value), then the ack.

Crash-only: there is no shutdown path the restart depends on. At start the runner loads its
state from KV, restores the engine (and the paper account), reconciles with the broker
(``broker.reconcile(Ledger.from_snapshot(...))``; trading waits until it passes), applies what
the broker did meanwhile, rebuilds the feature window from the warehouse (read once) and the
bars it already processed (from the stream), and resumes the consumer right after the last bar
it saved. The bar a crash interrupted comes again and is done again: the same decision names
the same client order ids, so the broker places nothing twice (the paper account rolled back
with the engine; MT5 finds the order by id and the replay claims it). SIGTERM finishes the bar
and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import polars as pl

from live.config import RunnerConfig
from live.history import WarmUp, warm_up
from live.ledger import LedgerWriter, Message, Window
from live.metrics import KILL_LEVEL, RunnerMetrics
from live.model import LiveModel, ModelRefused, ModelWatcher, load_live_model, parse_ref
from live.state import COMPACT_MS, CONTROL_BUCKET, STATE_BUCKET, RunnerState, compact_snapshot, kill_key, state_key, status_key
from models.features.online import RollingFeatures
from models.features.registry import feature_set_version
from models.market.candles import BAR_SCHEMA
from models.market.instruments import Instrument, instrument
from models.market.timeframes import bar_close_at, bar_open_at
from models.trading.broker import BrokerEvent, BrokerPort, BrokerTimeout, OrderStatus, SubmitAck
from models.trading.currency import conversion_mode, mark_conversion
from models.trading.engine import BarBlock, EngineConfig, TradingEngine
from models.trading.ledger import Ledger
from models.trading.orders import Order
from models.trading.risk import KillSwitch, RiskModel
from models.trading.strategy import ModelStrategy
from resources.bus import subjects
from resources.bus.client import NatsBus
from resources.bus.messages import BadMessage, decode_bar, decode_object
from resources.bus.external import SUBJECT as EXTERNAL_SUBJECT
from resources.bus.external import ExternalUpdate
from resources.bus.streams import BARS_STREAM, EXTERNAL_STREAM, bars_stream, ledger_streams

log = logging.getLogger("tradeforge.live")
SENT_HEADER = "Tradeforge-Sent-Ns"  # optional: when the publisher sent the bar (benchmarks)


class RunnerError(RuntimeError):
    """The runner cannot start as configured; the message is one line."""


class _TimedBroker(BrokerPort):
    """The broker port with a stopwatch: the time the engine spends in the broker, per bar."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bar_driven = inner.bar_driven
        self.seconds = 0.0

    def _timed(self, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds += time.perf_counter() - t0

    def submit(self, order: Order) -> SubmitAck:
        return self._timed(lambda: self.inner.submit(order))

    def cancel(self, client_id: str) -> SubmitAck:
        return self._timed(lambda: self.inner.cancel(client_id))

    def advance(self, symbol: str, ts: int, open_: float, high: float, low: float, close: float, half_spread: float,
                conv_known: float) -> list[BrokerEvent]:
        return self._timed(lambda: self.inner.advance(symbol, ts, open_, high, low, close, half_spread, conv_known))

    def order_status(self, client_id: str) -> OrderStatus | None:
        return self._timed(lambda: self.inner.order_status(client_id))

    def positions(self) -> dict[str, float]:
        return self._timed(self.inner.positions)


@dataclass
class BarOutcome:
    """What one message did (for tests and the benchmark)."""

    seq: int
    symbol: str = ""
    ts: int = 0
    status: str = ""  # processed, or the reason it was refused
    orders: int = 0  # orders the bar created
    received: float = 0.0  # time.time() when the message arrived
    accepted: float = 0.0  # time.time() when the engine's step (orders accepted) ended
    sent: float | None = None  # the publisher's time, when it said


def make_broker(config: RunnerConfig) -> tuple[Any, dict[str, Instrument]]:
    """The broker the configuration names, connected, and the instruments as it trades them."""
    specs = {s: instrument(s) for s in config.symbols}
    if config.broker == "paper":
        from resources.brokers.paper import PaperBroker

        modes = {s: conversion_mode(specs[s], config.account_currency) for s in config.symbols}
        return PaperBroker(specs, config.fill, modes), specs
    from resources.brokers.mt5.broker import MT5Broker, MT5Config, load_mt5_module, magic_number

    if config.mt5_fake:
        from resources.brokers.mt5 import remote

        module = remote.connect(config.mt5_fake)
        clock, sleep = module.utc_now, (lambda s: None)
    else:
        module, clock, sleep = load_mt5_module(), time.time, time.sleep
    broker = MT5Broker(module, MT5Config(magic=magic_number(config.strategy), symbols=config.symbols), clock=clock, sleep=sleep,
                       account_currency=config.account_currency)
    broker.connect_from_environment(fake=bool(config.mt5_fake))
    return broker, {s: broker.trading_spec(s) for s in config.symbols}


class LiveRunner:
    def __init__(self, config: RunnerConfig, *, bus: NatsBus, registry: Any, warehouse: Any,
                 feature_set: str | None = None) -> None:
        self.config = config
        self.bus = bus
        self.registry = registry
        self.warehouse = warehouse
        self.feature_set = feature_set or feature_set_version()
        self.metrics = RunnerMetrics(config.name)
        self.ledger = LedgerWriter(config.name, config.timeframe.value)
        self.state = RunnerState(config.name, config.strategy)
        self.engine: TradingEngine | None = None
        self.broker: Any = None
        self.timed: _TimedBroker | None = None
        self.model: LiveModel | None = None
        self.watcher: ModelWatcher | None = None
        self.strategy: ModelStrategy | None = None
        self.features: dict[str, RollingFeatures] = {}
        self.external: dict[str, Any] = {}
        self.external_read_at = 0  # ms, when the external data the runner holds was read (0: not yet)
        self._external_waiting: list[ExternalUpdate] = []  # updates that came during the warm-up
        self._xsub: Any = None
        self.history_end: dict[str, int] = {}  # symbol -> the newest warm-up bar's open (bars up to it are history)
        self.recent: dict[str, deque] = {s: deque(maxlen=256) for s in config.symbols}  # opens of the last bars processed
        self.marks: dict[str, float] = {}
        self.outcomes: deque[BarOutcome] = deque(maxlen=100_000)
        self.kill_command: tuple[int, dict] | None = None  # (KV revision, value) not applied yet
        self.claim_check = False  # MT5 after a restart: check claims and positions after the first bar
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()
        self._psub: Any = None
        self._kill_watcher: Any = None
        self._tasks: list[asyncio.Task] = []
        self._last_message = time.monotonic()
        self._pending: list[Message] = []
        self._kill_refused = 0  # the KV revision of a kill command refused (not refused again)
        self._messages: list[Message] = []  # the ledger of the bar in hand, not published yet
        self._current: BarOutcome | None = None
        self._applied_kill: tuple[int, int, dict] | None = None  # (revision before, revision, command) of this bar
        self._stage = "checks"  # how far the bar in hand got: checks, features, maintain, model, engine, after, publish

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        started = time.perf_counter()
        await self.bus.connect()
        for spec in (bars_stream(), *ledger_streams()):
            await self.bus.ensure_stream(spec)
        self.kv_state = await self.bus.key_value(STATE_BUCKET)
        self.kv_control = await self.bus.key_value(CONTROL_BUCKET)
        saved = await self._kv_get(self.kv_state, state_key(c.name))
        if saved is not None:
            try:
                self.state = RunnerState.from_json(saved[1])
            except (ValueError, TypeError, KeyError) as exc:
                raise RunnerError(f"runner {c.name}: its saved state in NATS KV ({STATE_BUCKET}/{state_key(c.name)}) "
                                  f"cannot be read ({exc}): inspect or delete it") from None
            if self.state.strategy != c.strategy:
                raise RunnerError(f"runner {c.name} saved the state of strategy {self.state.strategy!r}, not {c.strategy!r}: "
                                  f"use --strategy {self.state.strategy} or another --name")
        self.state.starts += 1
        t_model = time.perf_counter()
        self.model = load_live_model(self.registry, parse_ref(c.model), self.feature_set)
        t_model = time.perf_counter() - t_model
        self.strategy = ModelStrategy(column=self.model.column, **{k: v for k, v in c.thresholds.items() if k != "column"})
        broker, specs = make_broker(c)
        self.broker = broker
        self.timed = _TimedBroker(broker)
        spreads = {s: c.fill.spread if c.fill.spread is not None else specs[s].spread for s in c.symbols}
        self.specs, self.spreads = specs, spreads
        self.engine = TradingEngine(EngineConfig(c.strategy, c.initial_equity, c.account_currency, c.day_boundary),
                                    RiskModel(c.risk), self.timed, specs, spreads)
        fresh = self.state.engine is None
        messages: list[Message] = []
        tag = f"start{self.state.bars}"
        window = Window(self.engine)
        if not fresh:
            self.engine.restore(self.state.engine)
            if self.state.broker is not None and hasattr(broker, "load"):
                broker.load(self.state.broker)
            window = Window(self.engine)
            # The last bar was processed after its close, and the broker was read then: what the
            # account did before that close (a stop hit inside the bar) is booked, not news.
            ledger = Ledger.from_snapshot(self.state.engine)
            report = broker.reconcile(replace(ledger, as_of_ms=ledger.as_of_ms + c.bar_ms) if ledger.as_of_ms else ledger)
            log.info("%s: %s", c.name, report.summary())
            if not report.ok:
                self.engine.set_kill_switch(KillSwitch.HALT, report.summary())
                messages.append(self.ledger.alert("reconcile", f"{self.state.starts}", self._now_ms(), "", report.summary()))
            self.engine.on_broker_events(broker.drain_events())
            self.claim_check = c.broker == "mt5"
        self.state.model_version = self.model.version
        self.metrics.model_version.set(float(self.model.version))
        self.marks = {s: self.engine.snapshot()["symbols"][s]["last_close"] for s in c.symbols} if not fresh else {}
        await self._subscribe_external()  # before the warm-up's read: nothing published after it is missed
        await self._warm_up(fresh)
        await self._kill_command()
        messages += self.ledger.changes(self.engine, window, tag, self._now_ms(), self.model.version)
        await self._publish(messages)
        await self._save()
        await self._consumer()
        self.watcher = ModelWatcher(self.registry, parse_ref(c.model), self.feature_set, self.model.version, c.model_poll_s,
                                    on_refused=self._model_refused)
        self.watcher.start()
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve(c.metrics_port, c.metrics_host)
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._watch_kill())]
        self._update_gauges()
        log.info("%s: trading %s %s with %s on the %s broker from bar %s (start %d, %d bars so far; started in %.2fs, "
                 "the model loaded in %.2fs)", c.name, " ".join(c.symbols), c.timeframe.value, self.model.label, c.broker,
                 {s: _iso(t) for s, t in self.state.last_ts.items()} or "the first", self.state.starts, self.state.bars,
                 time.perf_counter() - started, t_model)

    async def _warm_up(self, fresh: bool) -> None:
        """Features from the warehouse (once) plus the bars already processed (from the stream);
        a fresh engine also steps through the warm-up bars (no decisions: ATR and marks)."""
        c = self.config
        before: dict[str, datetime | None] = {}
        for s in c.symbols:
            cut = c.history_end
            if s in self.state.last_ts:
                done = _dt(self.state.last_ts[s] + 1)
                cut = min(cut, done) if cut else done
            before[s] = cut
        read_at = self._now_ms()
        history: WarmUp = await asyncio.to_thread(warm_up, self.warehouse, c.symbols, c.timeframe, before)
        empty = [s for s in c.symbols if history.bars[s].is_empty()]
        if empty:
            cut = min((b for b in before.values() if b is not None), default=None)
            where = self.warehouse.describe() if hasattr(self.warehouse, "describe") else "the warehouse"
            raise RunnerError(f"no {c.timeframe.value} bars of {', '.join(empty)}{f' before {cut:%Y-%m-%d %H:%M}' if cut else ''} "
                              f"in {where}: the runner warms its features up on the stored history; ingest it first "
                              f"(tradeforge demo / import, or the Dagster UI)")
        self.external = history.external
        self.external_read_at = read_at
        for update in self._external_waiting:
            self._apply_external(update)
        self._external_waiting = []
        for s in c.symbols:
            rolling = RollingFeatures(c.timeframe, c.day_boundary)
            rolling.seed(history.bars[s])
            self.features[s] = rolling
            self.history_end[s] = history.last_ts(s)
            if history.bars[s].height:
                self.recent[s].extend(int(t.timestamp() * 1000) for t in history.bars[s]["ts"].tail(self.recent[s].maxlen))
            if fresh:
                self.state.warmup_end[s] = history.last_ts(s)
        if fresh:
            for s in c.symbols:
                frame = history.bars[s]
                if frame.height:
                    spec = self.specs[s]
                    conv = mark_conversion(conversion_mode(spec, c.account_currency), frame["close"].to_numpy())
                    self.engine.run(s, BarBlock.build(frame, None, self.spreads[s], conv, c.fill.use_bar_quotes))
                    self.marks[s] = float(frame["close"][-1])
        else:
            await self._catch_up()
        log.info("%s: warm-up %s in %.2fs (features %s)", c.name,
                 ", ".join(f"{s} {history.bars[s].height} bars" for s in c.symbols), history.seconds,
                 "warm" if all(f.warm for f in self.features.values()) else "warming up")

    async def _catch_up(self) -> None:
        """Seed the feature windows with the bars processed after the warm-up history ended,
        read back from the bar stream (the warehouse may not have them yet)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        need = {s: (self.history_end[s], self.state.last_ts[s]) for s in self.config.symbols
                if s in self.state.last_ts and self.state.last_ts[s] > self.history_end[s]}
        if not need or not self.state.first_seq:
            return
        js = self.bus.js
        info = await js.add_consumer(BARS_STREAM.name, ConsumerConfig(
            filter_subjects=[subjects.bars(s, self.config.timeframe.value) for s in need], ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.state.first_seq, inactive_threshold=30.0,
            max_ack_pending=-1))
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=BARS_STREAM.name)
        seeded = {s: 0 for s in need}
        try:
            done = False
            while not done:
                try:
                    msgs = await sub.fetch(batch=256, timeout=1.0)
                except Exception:  # noqa: BLE001  (nats' TimeoutError: nothing more)
                    break
                for msg in msgs:
                    if msg.metadata.sequence.stream > self.state.last_seq:
                        done = True
                        break
                    try:
                        bar = decode_bar(msg.data, msg.subject)
                    except BadMessage:
                        continue
                    if self._off_grid(bar) is not None:  # refused when it came: not in the window either
                        continue
                    s, ts = bar["symbol"], bar["ts"]
                    lo, hi = need.get(s, (0, -1))
                    if lo < ts <= hi and ts > self._seen_last(s):
                        self.features[s].seed(_bar_frame(bar))
                        self.recent[s].append(ts)
                        seeded[s] += 1
                        self.marks[s] = bar["close"]
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(BARS_STREAM.name, info.name)
        for s, (lo, hi) in need.items():
            expected = self.state.last_ts[s]
            if self._seen_last(s) != expected:
                log.warning("%s: the feature window of %s has a gap: the stream no longer holds every bar between the "
                            "warehouse's last (%s) and the last processed (%s); %d bars read back", self.config.name, s,
                            _iso(lo), _iso(hi), seeded[s])

    def _off_grid(self, bar: dict) -> tuple[str, str] | None:
        """(reason, detail) when the bar's times are not a bar of the runner's timeframe and day
        boundary (its open on the grid, its close the open plus the timeframe), else None."""
        c = self.config
        opened = _dt(bar["ts"])
        if bar_open_at(opened, c.timeframe, c.day_boundary) != opened:
            return "off_grid", (f"{bar['symbol']} bar at {opened:%Y-%m-%d %H:%M:%S} is not the open of a {c.timeframe.value} "
                                f"bar ({c.day_boundary.value} days)")
        close_ts = round(bar_close_at(opened, c.timeframe, c.day_boundary).timestamp() * 1000)
        if bar["close_ts"] != close_ts:
            return "impossible", (f"{bar['symbol']} {c.timeframe.value} bar at {_iso(bar['ts'])} closes at {close_ts}, "
                                  f"not {bar['close_ts']}")
        return None

    def _seen_last(self, symbol: str) -> int:
        return self.recent[symbol][-1] if self.recent[symbol] else self.history_end.get(symbol, -1)

    async def _consumer(self) -> None:
        """The durable consumer, placed right after the last bar message the saved state handled."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        js = self.bus.js
        name = f"live-{self.config.name}"
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            self._psub = None
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(BARS_STREAM.name, name)
        config = ConsumerConfig(durable_name=name, filter_subjects=[subjects.bars(s, self.config.timeframe.value)
                                                                    for s in self.config.symbols],
                                ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1, ack_wait=self.config.ack_wait_s,
                                max_deliver=-1)
        if self.state.last_seq:
            config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, self.state.last_seq + 1
        else:
            config.deliver_policy = DeliverPolicy.ALL
        await js.add_consumer(BARS_STREAM.name, config)
        self._psub = await js.pull_subscribe_bind(durable=name, stream=BARS_STREAM.name)

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> int:
        """Process bars until stopped (SIGTERM, SIGINT, :meth:`request_stop`, or idle in a replay)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
        idle = self.config.stop_when_idle_s
        self._last_message = time.monotonic()
        try:
            await self._loop(idle)
        finally:
            await self.close()
        return 0

    async def _loop(self, idle: float | None) -> None:
        reconnects = self.bus.nc.stats["reconnects"]
        while not self._stop.is_set():
            if self.bus.nc.stats["reconnects"] != reconnects:
                # The server came back: place the consumer right after the last bar saved, so a delivery or
                # an ack lost in the outage costs nothing (else the one message in flight waits for ack_wait).
                try:
                    await self._consumer()
                    reconnects = self.bus.nc.stats["reconnects"]
                    log.info("%s: reconnected; consuming from bar message %d", self.config.name, self.state.last_seq + 1)
                except Exception as exc:  # noqa: BLE001  (not back yet)
                    log.warning("%s: the bus is back but the consumer is not yet (%s)", self.config.name, exc)
                    await asyncio.sleep(0.2)
                    continue
            try:
                msgs = await self._psub.fetch(batch=1, timeout=0.5)
            except Exception as exc:  # noqa: BLE001  (a timeout, or the server going away: nats reconnects)
                if _is_timeout(exc):
                    if idle and time.monotonic() - self._last_message > idle:
                        log.info("%s: no bar for %.0fs: stopping (replay done)", self.config.name, idle)
                        break
                    continue
                log.warning("%s: fetching bars failed (%s); retrying", self.config.name, exc or type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                self._last_message = time.monotonic()
                await self.handle(msg)

    def request_stop(self) -> None:
        self._stop.set()

    async def handle(self, msg: Any) -> BarOutcome:
        """One bar message, start to ack (see the module doc), behind a guard: no message can
        crash the daemon or make it crash-loop on its redelivery.

        A broker that cannot be reached mid-bar (``BrokerTimeout`` or a lost connection escaping
        the engine) leaves the account in a state only a reconciliation can settle: the runner
        stops with one line (:class:`RunnerError`), unacknowledged, and the restart reconciles.
        Any other exception is a bug or an input the checks missed: it is logged with the
        message's subject and sequence, counted (``rejected{reason="error"}``), published on
        ``risk.alert.bad_bar`` with the exception's text and the message terminated. If the
        engine had started on the bar, its account is rolled back to the last saved state
        first, and with a real broker (which may have acted) trading halts (saved with the
        refusal): a restart reconciles with the broker, and an operator turns the switch off."""
        self._stage = "checks"
        try:
            return await self._handle(msg)
        except RunnerError:
            raise
        except (BrokerTimeout, ConnectionError) as exc:
            if not self._engine_moved():  # nothing reached the broker: a bug, refused below
                return await self._failed(msg, exc)
            raise RunnerError(f"runner {self.config.name}: the broker did not answer during bar message "
                              f"{msg.metadata.sequence.stream} on {msg.subject} ({type(exc).__name__}: {exc}): stopping "
                              f"unacknowledged; a restart reconciles with the broker and does the bar again") from None
        except Exception as exc:  # noqa: BLE001  (the guard: counted and published, never silent)
            return await self._failed(msg, exc)

    def _engine_moved(self) -> bool:
        """Whether the bar in hand may have changed the engine or reached the broker (the kill
        switch applied, with its flatten orders, or the engine's step begun)."""
        if self._stage == "model":
            return self._applied_kill is not None
        return self._stage in ("maintain", "engine", "after", "publish")

    async def _failed(self, msg: Any, exc: Exception) -> BarOutcome:
        seq = msg.metadata.sequence.stream
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        log.error("%s: bar message %d on %s failed at the %s stage (%s): refused and terminated", self.config.name, seq,
                  msg.subject, self._stage, text)
        log.debug("the failure of bar message %d", seq, exc_info=True)
        out = self._current or BarOutcome(seq)
        if self._engine_moved():  # the account may be half-stepped: back to the last saved state
            self.engine.restore(self.state.engine)
            if self.state.broker is not None and hasattr(self.broker, "load"):
                self.broker.load(self.state.broker)
            if self.config.broker != "paper" and self.engine.kill is not KillSwitch.HALT:
                self.engine.set_kill_switch(KillSwitch.HALT, f"internal error at bar message {seq} ({text}): restart the "
                                                             f"runner to reconcile with the broker, then `tradeforge live "
                                                             f"kill --off` once the cause is understood")
            if self._applied_kill is not None and self.kill_command is None:  # undone with the engine: at the next bar
                self.state.kill_revision, self.kill_command = self._applied_kill[0], self._applied_kill[1:]
        return await self._refuse(msg, out, "error", text, terminate=True)

    async def _handle(self, msg: Any) -> BarOutcome:
        self._current, self._messages, self._applied_kill = None, [], None
        received = time.time()
        t0 = time.perf_counter()
        seq = msg.metadata.sequence.stream
        out = self._current = BarOutcome(seq, received=received)
        sent = (msg.headers or {}).get(SENT_HEADER)
        out.sent = int(sent) / 1e9 if sent else msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else None
        if seq <= self.state.last_seq:  # delivered again after its save (the ack was lost): done already
            await self._ack(msg)
            out.status = "redelivered"
            return out
        try:
            bar = decode_bar(msg.data, msg.subject)
            if bar["symbol"] not in self.features or bar["timeframe"] != self.config.timeframe.value:
                raise BadMessage("wrong_subject", f"{bar['symbol']} {bar['timeframe']} is not traded by this runner")
        except BadMessage as bad:
            return await self._refuse(msg, out, bad.reason, str(bad))
        symbol, ts = bar["symbol"], bar["ts"]
        out.symbol, out.ts = symbol, ts
        c = self.config
        off = self._off_grid(bar)
        if off is not None:
            return await self._refuse(msg, out, *off)
        if bar["close_ts"] > received * 1000 + c.max_clock_skew_s * 1000:
            return await self._refuse(msg, out, "future", f"{symbol} bar closes at {_dt(bar['close_ts']):%Y-%m-%d %H:%M:%S}, "
                                                          f"{bar['close_ts'] / 1000 - received:.0f}s after now on this "
                                                          f"runner's clock (tolerance {c.max_clock_skew_s:.0f}s)")
        if ts <= self._seen_last(symbol):
            if symbol not in self.state.last_ts and ts <= self.history_end[symbol]:
                out.status = "in_history"  # the warm-up already holds this bar (a fresh runner reads the whole stream)
                self.metrics.rejected.labels("in_history").inc()
                self.state.last_seq = seq
                await self._ack(msg)
                return out
            reason = "duplicate" if ts in self.recent[symbol] else "out_of_order"
            return await self._refuse(msg, out, reason, f"{symbol} bar {_iso(ts)} is not after the last one, {_iso(self._seen_last(symbol))}")
        engine = self.engine
        self._compact(ts)
        window = Window(engine)
        tag = str(self.state.bars + 1)
        messages: list[Message] = self._messages
        frame = _bar_frame(bar)
        t1 = time.perf_counter()
        self._stage = "features"
        try:
            row = self.features[symbol].update(frame, self.external.get(symbol))
        except ValueError as exc:
            return await self._refuse(msg, out, "impossible", str(exc))
        self.recent[symbol].append(ts)  # the window holds it now (a restart's catch-up reads it back too)
        self.marks[symbol] = bar["close"]
        self._stage = "maintain"
        self._maintain(ts, messages)  # after the last refusal that leaves the engine as it was
        self._stage = "model"
        t2 = time.perf_counter()
        model = self.model
        value, sig, status, reason = None, None, "signal", ""
        stale = c.stale_after_s > 0 and received - bar["close_ts"] / 1000 > c.stale_after_s
        if not self.features[symbol].warm:
            status, reason = "warming_up", f"feature window not warm yet ({self.features[symbol]._seen} bars)"
        else:
            value = model.predict(row)
            if stale:
                status, reason = "stale", f"the bar closed {received - bar['close_ts'] / 1000:.0f}s ago (limit {c.stale_after_s:.0f}s): no decision"
                # its prices still move the features and the account; the decision is refused, counted and published
                self.metrics.rejected.labels("stale").inc()
                messages.append(self.ledger.alert("bad_bar", str(seq), ts, symbol, f"stale: {reason}", subject=msg.subject,
                                                  stream_seq=seq))
            else:
                sig = self.strategy.signal(value)
        t3 = time.perf_counter()
        self.timed.seconds = 0.0
        self._stage = "engine"
        engine.on_bar(symbol, {"ts": ts, "open": bar["open"], "high": bar["high"], "low": bar["low"], "close": bar["close"],
                               "bid_close": bar["bid_close"], "ask_close": bar["ask_close"]}, sig)
        t4 = time.perf_counter()
        out.accepted = received + (t4 - t0)
        broker_s = self.timed.seconds
        self._stage = "after"
        self._after_step(ts, symbol, messages)
        self.state.bars += 1
        self.state.last_seq = seq
        self.state.first_seq = self.state.first_seq or seq
        self.state.last_ts[symbol] = ts
        equity = engine.equity()
        self.state.peak = max(self.state.peak or c.initial_equity, equity)
        messages.append(self.ledger.signal(symbol, ts, bar["close_ts"], model, value, sig, status, reason, self.feature_set))
        messages += self.ledger.changes(engine, window, tag, ts, model.version)
        messages.append(self.ledger.portfolio(engine, self.state.bars, ts, symbol, self.marks, self.state.peak, model.version))
        out.orders = sum(1 for order, first in window.transitions(engine) if first == 0)
        t5 = time.perf_counter()
        self._stage, self._messages = "publish", []
        await self._publish(messages)
        t6 = time.perf_counter()
        await self._save()
        await self._ack(msg)
        t7 = time.perf_counter()
        out.status = "processed"
        m = self.metrics
        if out.sent is not None:
            m.observe("bus", max(0.0, received - out.sent))
        m.observe("features", t2 - t1)
        m.observe("inference", t3 - t2)
        m.observe("broker", broker_s)
        m.observe("risk", max(0.0, t4 - t3 - broker_s))
        m.observe("bar", t4 - t0)
        m.observe("publish", t6 - t5)
        m.observe("persist", t7 - t6)
        m.bars.labels(symbol).inc()
        for status_, n in self.ledger.counts.items():
            m.orders.labels(status_).inc(n)
        m.fills.inc(len(engine.fills) - window.fills)
        m.last_bar.labels(symbol).set(ts / 1000)
        self._update_gauges()
        self.outcomes.append(out)
        return out

    def _maintain(self, ts: int, messages: list[Message]) -> None:
        """Between bars: the operator's kill command, a model the alias moved to, what the watcher refused."""
        engine, state = self.engine, self.state
        if self._pending:  # alerts from the watcher's thread (a refused version): with this bar's ledger
            pending, self._pending = self._pending, []
            messages.extend(pending)
        if self.kill_command is not None:
            revision, command = self.kill_command
            self.kill_command = None
            if revision > state.kill_revision:
                self._applied_kill = (state.kill_revision, revision, command)
                mode = KillSwitch(command.get("mode", "halt"))
                engine.set_kill_switch(mode, command.get("reason") or "operator", flatten=bool(command.get("flatten")))
                state.kill_revision = revision
                log.warning("%s: kill switch %s by the operator (%s)%s", self.config.name, mode.value,
                            command.get("reason") or "no reason given", ", flattening" if command.get("flatten") else "")
        if self.watcher is not None:
            new = self.watcher.take()
            if new is not None:
                old = self.model
                self.model = new
                state.model_version = new.version
                self.metrics.model_version.set(float(new.version))
                messages.append(self.ledger.alert("model_swap", new.version, ts, "", f"{old.label} -> {new.label}",
                                                  model_version=new.version))
                log.info("%s: now serving %s (was %s)", self.config.name, new.label, old.label)

    def _compact(self, ts: int) -> None:
        """At the first bar of each period, forget what finished before the previous one (see live.state)."""
        engine, state = self.engine, self.state
        period = ts // COMPACT_MS
        if period > state.compacted:
            if state.compacted >= 0:
                before = (period - 1) * COMPACT_MS
                snapshot = compact_snapshot(engine.snapshot(), before, self.config.risk.order_window_minutes * 60_000)
                engine.restore(snapshot)
                if hasattr(self.broker, "compact"):
                    self.broker.compact(before)
            state.compacted = period

    def _after_step(self, ts: int, symbol: str, messages: list[Message]) -> None:
        """A broker that halted trips the kill switch; after a restart, check the replay's claims."""
        engine, broker = self.engine, self.broker
        if self.claim_check:
            try:
                broker.check_claimed()
                # the fills the bar's own orders made are booked by the engine at its next bar: count them
                pending = broker.pending_units()
                differences = {s: (ours + pending.get(s, 0.0), theirs) for s, (ours, theirs) in engine.reconcile().items()
                               if abs(ours + pending.get(s, 0.0) - theirs) > 1e-9}
            except BrokerTimeout as exc:  # the terminal hiccuped: the check waits for the next bar, orders stay UNKNOWN
                reason = f"the check of positions after the restart got no answer from the broker ({exc}): asked again at the next bar"
                messages.append(self.ledger.alert("broker_timeout", f"claims:{ts}", ts, symbol, reason))
                log.warning("%s: %s", self.config.name, reason)
                differences = None
            else:
                self.claim_check = False
            if differences and not broker.halted:
                broker.halted = ("trading halted: positions differ from the broker's after the restart: "
                                 + ", ".join(f"{s} engine {a:+,.0f} broker {b:+,.0f}" for s, (a, b) in sorted(differences.items())))
        if broker.halted and engine.kill is KillSwitch.OFF:
            engine.set_kill_switch(KillSwitch.HALT, broker.halted)
            messages.append(self.ledger.alert("broker_halted", str(ts), ts, symbol, broker.halted))
            log.error("%s: %s", self.config.name, broker.halted)

    async def _refuse(self, msg: Any, out: BarOutcome, reason: str, detail: str, terminate: bool = False) -> BarOutcome:
        """Count, log and publish the refusal with what the bar had already produced (alerts of
        the model watcher, a model swap, the kill switch's orders), save the state, then ack (or
        terminate)."""
        self.metrics.rejected.labels(reason).inc()
        seq = msg.metadata.sequence.stream
        log.warning("%s: bar message %d on %s refused: %s", self.config.name, seq, msg.subject, detail)
        alert = self.ledger.alert("bad_bar", str(seq), out.ts or self._now_ms(), out.symbol, f"{reason}: {detail}",
                                  subject=msg.subject, stream_seq=seq)
        messages, self._messages = [*self._messages, alert], []
        await self._publish(messages)
        self.state.last_seq = seq
        await self._save()  # done with it: a restart does not refuse (and count) it again
        if terminate:
            with contextlib.suppress(Exception):  # not redelivered: it failed once, it would fail again
                await msg.term()
        else:
            await self._ack(msg)
        out.status = reason
        self.outcomes.append(out)
        return out

    # -- the bus ----------------------------------------------------------------------------------
    async def _publish(self, messages: list[Message]) -> None:
        """Every message stored (JetStream acknowledged), retried until the bus answers: the bar is
        acknowledged only after its ledger and state are safe."""
        if not messages:
            return
        js = self.bus.js
        delay = 0.1
        while True:
            results = await asyncio.gather(*(js.publish(m.subject, json.dumps(m.data, separators=(",", ":")).encode(),
                                                        timeout=2.0, headers={"Nats-Msg-Id": m.msg_id}) for m in messages),
                                           return_exceptions=True)
            failed = [m for m, r in zip(messages, results) if isinstance(r, BaseException)]
            if not failed:
                return
            log.warning("%s: %d ledger message(s) not stored yet (%s); retrying", self.config.name, len(failed),
                        next(r for r in results if isinstance(r, BaseException)))
            messages = failed
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _save(self) -> None:
        self.state.engine = self.engine.snapshot()
        self.state.broker = self.broker.state() if hasattr(self.broker, "state") else None
        payload = self.state.to_json()
        delay = 0.1
        while True:
            try:
                await self.kv_state.put(state_key(self.config.name), payload)
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: saving the state failed (%s); retrying", self.config.name, exc or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                with contextlib.suppress(Exception):
                    self.kv_state = await self.bus.key_value(STATE_BUCKET)

    async def _ack(self, msg: Any) -> None:
        with contextlib.suppress(Exception):  # a lost ack: the message comes again and is recognised as done
            await msg.ack()

    @staticmethod
    async def _kv_get(kv: Any, key: str) -> tuple[int, bytes] | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:  # deleted
            return None
        return entry.revision, entry.value

    # -- external data ------------------------------------------------------------------------------
    async def _subscribe_external(self) -> None:
        """New FRED, commodity and calendar rows (``market.external.update``, published by Dagster
        when those tables change): each replaces the window it carries, so the next bars see what
        a fresh read of the warehouse would give them (:mod:`resources.bus.external`)."""
        from nats.js.api import DeliverPolicy

        await self.bus.ensure_stream(EXTERNAL_STREAM)
        self._xsub = await self.bus.js.subscribe(EXTERNAL_SUBJECT, stream=EXTERNAL_STREAM.name, cb=self._on_external,
                                                 ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)

    async def _on_external(self, msg: Any) -> None:
        try:
            update = ExternalUpdate.decode(msg.data)
        except Exception as exc:  # noqa: BLE001 - BadMessage, or anything else: refused, never silent
            log.warning("%s: an external update refused (%s); the external data stays as it was", self.config.name, exc)
            return
        if not self.external_read_at:
            self._external_waiting.append(update)  # applied once the warm-up has read its own
            return
        self._apply_external(update)

    def _apply_external(self, update: ExternalUpdate) -> None:
        read_at = int(update.read_at.timestamp() * 1000)
        if read_at <= self.external_read_at:
            return  # read before what the runner holds
        try:
            external = {s: update.apply(self.external.get(s), instrument(s).currencies) for s in self.config.symbols}
        except Exception as exc:  # noqa: BLE001 - a bad update must not stop the trading
            log.warning("%s: an external update could not be applied (%s); the external data stays as it was",
                        self.config.name, exc)
            return
        self.external, self.external_read_at = external, read_at  # between two bars: the event loop runs one at a time
        log.info("%s: external data read at %s taken in (%d values, %d events from %s)", self.config.name, _iso(read_at),
                 update.values.height, update.events.height, f"{update.since:%Y-%m-%d %H:%M}")

    async def _kill_command(self) -> None:
        """At start: the operator's command written since the state was saved, to apply at the first bar."""
        found = await self._kv_get(self.kv_control, kill_key(self.config.name))
        if found is None or found[0] <= self.state.kill_revision:
            return
        command = self._kill_value(*found)
        if command is None:
            self._kill_refused = found[0]
        else:
            self.kill_command = (found[0], command)

    def _kill_value(self, revision: int, raw: bytes) -> dict | None:
        """The operator's kill command in KV, checked (it may be written by hand with ``nats kv
        put``): a JSON object with ``mode`` off|halt|reduce_only (halt when absent), ``flatten``
        a boolean, ``reason`` text. Anything else is refused with one line and a
        ``risk.alert.kill_switch`` alert (with the next bar's ledger); the switch stays as it is."""
        modes = [m.value for m in KillSwitch]
        try:
            command = decode_object(raw)
        except BadMessage as exc:
            problem = exc.detail
        else:
            if command.get("mode", "halt") not in modes:
                problem = f"mode {command.get('mode')!r} is not one of {', '.join(modes)}"
            elif not isinstance(command.get("flatten", False), bool):
                problem = f"flatten {command.get('flatten')!r} is not true or false"
            elif not isinstance(command.get("reason") or "", str):
                problem = f"reason {command.get('reason')!r} is not text"
            else:
                return command
        problem = problem[:300]
        log.warning("%s: the kill command in NATS KV (%s/%s, revision %d) is refused: %s; the kill switch stays %s "
                    "(write it with tradeforge live kill)", self.config.name, CONTROL_BUCKET, kill_key(self.config.name),
                    revision, problem, self.engine.kill.value if self.engine is not None else "as it is")
        self._pending.append(self.ledger.alert("kill_switch", f"refused:{revision}", self._now_ms(), "",
                                               f"kill command revision {revision} refused: {problem}"))
        return None

    async def _watch_kill(self) -> None:
        """The operator's kill command, as soon as it is written (applied at the next bar)."""
        failures = 0
        while not self._stop.is_set():
            try:
                watcher = self._kill_watcher = await self.kv_control.watch(kill_key(self.config.name))
                failures = 0
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    if entry.revision > self.state.kill_revision and entry.revision != self._kill_refused:
                        command = self._kill_value(entry.revision, entry.value)
                        if command is None:
                            self._kill_refused = entry.revision  # refused once, not again when the watch restarts
                        else:
                            self.kill_command = (entry.revision, command)
            except asyncio.CancelledError:
                return
            except Exception as exc:  # noqa: BLE001  (the server went away: watch again)
                failures += 1
                # a restart of the server is routine; a watch that keeps failing means kill commands are not heard
                (log.warning if failures == 3 or failures % 120 == 0 else log.debug)(
                    "%s: watching the kill switch in NATS KV failed %d time(s) in a row (%s); retrying", self.config.name,
                    failures, exc or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _heartbeat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                status = self.status()
                await self.bus.nc.publish(subjects.heartbeat(self.config.name), json.dumps(status).encode())
                await self.kv_control.put(status_key(self.config.name), json.dumps(status).encode())
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.heartbeat_s)
            except asyncio.TimeoutError:
                pass

    def status(self) -> dict:
        """The heartbeat (``live.heartbeat.{runner}`` and KV ``status.{runner}``; ``tradeforge live status`` shows it)."""
        engine, c = self.engine, self.config
        risk = c.risk
        return {"runner": c.name, "pid": os.getpid(), "host": socket.gethostname(), "at": time.time(),
                "symbols": list(c.symbols), "timeframe": c.timeframe.value, "strategy": c.strategy,
                "bars": self.state.bars, "last_ts": self.state.last_ts, "model": str(self.model.label if self.model else ""),
                "model_version": self.state.model_version, "equity": engine.equity() if engine else None,
                "positions": ({s: p.units for s, p in engine.portfolio.positions.items() if p.units} if engine else {}),
                "kill": engine.kill.value if engine else "", "kill_reason": engine.kill_reason if engine else "",
                "broker": c.broker, "metrics_port": self.metrics_port, "external_read_at": self.external_read_at or None,
                "limits": {"max_daily_loss": risk.max_daily_loss, "max_drawdown": risk.max_drawdown,
                           "risk_fraction": risk.risk_fraction, "max_open_positions": risk.max_open_positions,
                           "max_gross_exposure": risk.max_gross_exposure, "max_orders": risk.max_orders,
                           "breach_action": risk.breach_action.value, "flatten_on_breach": risk.flatten_on_breach}}

    def _model_refused(self, version: str, reason: str) -> None:
        self._pending.append(self.ledger.alert("model_refused", version, self._now_ms(), "", reason, model_version=version))

    def _update_gauges(self) -> None:
        engine = self.engine
        self.metrics.equity.set(engine.equity())
        self.metrics.kill.set(KILL_LEVEL[engine.kill.value])
        for s in self.config.symbols:
            self.metrics.units.labels(s).set(engine.portfolio.position(s).units if s in engine.portfolio.positions else 0.0)

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    async def close(self) -> None:
        self._stop.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self._pending:
            await self._publish(self._pending)
            self._pending = []
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._tasks and self.engine is not None:  # it was trading: the last heartbeat says it stopped
            with contextlib.suppress(Exception):
                await self.kv_control.put(status_key(self.config.name), json.dumps({**self.status(), "stopped": True}).encode())
        self._tasks = []
        for sub in (self._psub, self._kill_watcher, self._xsub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await (sub.stop() if sub is self._kill_watcher else sub.unsubscribe())
        self._psub = self._kill_watcher = self._xsub = None
        if self.broker is not None and hasattr(self.broker, "shutdown"):
            with contextlib.suppress(Exception):
                self.broker.shutdown()
        if self.bus.nc is not None:
            with contextlib.suppress(Exception):
                await self.bus.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self.bus.nc.close()
            self.bus.nc = self.bus.js = None


def _bar_frame(bar: dict) -> pl.DataFrame:
    """One decoded bar message as the feature engine's one-row frame."""
    row = {name: bar.get(name) for name in BAR_SCHEMA}
    row["ts"] = _dt(bar["ts"])
    return pl.DataFrame([row], schema=BAR_SCHEMA, orient="row")


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _iso(ms: int) -> str:
    return "-" if ms is None or ms < 0 else _dt(ms).strftime("%Y-%m-%d %H:%M")


def _is_timeout(exc: BaseException) -> bool:
    import nats.errors

    return isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError))


async def run_runner(config: RunnerConfig, *, bus: NatsBus, registry: Any, warehouse: Any,
                     on_started: Callable[[LiveRunner], None] | None = None) -> int:
    """Start and run a runner until it stops; ``on_started`` sees it once it trades."""
    runner = LiveRunner(config, bus=bus, registry=registry, warehouse=warehouse)
    try:
        await runner.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.close()
        raise
    if on_started is not None:
        on_started(runner)
    return await runner.run()


__all__ = ["BarOutcome", "LiveRunner", "ModelRefused", "RunnerError", "make_broker", "run_runner"]
