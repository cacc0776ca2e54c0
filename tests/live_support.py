"""Shared by the live runner's tests: bars, a registered model, the warehouse's history, bar
publishing, reading the runner's state and ledger back from NATS."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from models.features.compute import compute_features
from models.features.registry import WARMUP_BARS, feature_set_version
from models.market.candles import BAR_SCHEMA
from models.market.timeframes import Timeframe
from resources.bus import NatsBus
from resources.bus.messages import bar_msg_id, encode_bar
from resources.bus.streams import BARS_STREAM
from resources.registry import ModelRegistry
from resources.warehouse.market import write_bars

BAR_MS = 300_000
START = datetime(2024, 3, 1, tzinfo=UTC)  # a Friday: history spans a weekend for the FX pair
LEVELS = {"EURUSD": (1.085, 0.0004, 0.00002), "XAUUSD": (2050.0, 0.6, 0.3), "BTCUSD": (62_000.0, 60.0, 8.0)}
FEATURES = ("rsi_14", "macd_hist", "bb_position_20", "roc_5", "roc_20", "natr_14", "adx_14", "stoch_k", "cci_20",
            "ema_ratio_20", "willr_14", "roc_10", "sma_ratio_50", "realized_vol_30", "trix_15")


def make_bars(symbol: str, start: datetime, n: int, seed: int) -> pl.DataFrame:
    """``n`` M5 bars of a random walk every five minutes (no market hours: a continuous test market)."""
    level, step, half = LEVELS[symbol]
    rng = np.random.default_rng(seed)
    close = level * np.exp(np.cumsum(rng.normal(0, step / level, n)))
    open_ = np.r_[level, close[:-1]]
    wick = np.abs(rng.normal(0, step / level / 2, n))
    high, low = np.maximum(open_, close) * (1 + wick), np.minimum(open_, close) * (1 - wick)
    ts = [start + timedelta(milliseconds=BAR_MS * i) for i in range(n)]
    return pl.DataFrame({
        "symbol": symbol, "timeframe": "M5", "ts": ts, "open": open_, "high": high, "low": low, "close": close,
        "bid_close": close - half, "ask_close": close + half, "volume": 0.0, "tick_count": 120, "quote_count": 120,
        "spread_mean": 2 * half, "spread_max": 3 * half, "vwap": (high + low + close) / 3, "source": "test",
    }).cast(BAR_SCHEMA)  # type: ignore[arg-type]


def store_history(warehouse: Any, bars: pl.DataFrame) -> None:
    """Write bars into ``aggregates`` as the candle asset does (a partition per symbol and day)."""
    for (symbol,), part in bars.partition_by("symbol", as_dict=True).items():
        part = part.with_columns(covered_until=pl.col("ts").dt.truncate("1d") + pl.duration(days=1))
        days = sorted(set(part["ts"].dt.date().to_list()))
        first, last = days[0], days[-1]
        write_bars(warehouse, symbol, [first + timedelta(days=i) for i in range((last - first).days + 1)], part)


def train_and_register(tracking_uri: str, name: str, bars: pl.DataFrame, *, alias: str = "champion", seed: int = 7,
                       trees: int = 40, feature_set: str | None = None) -> tuple[str, Any]:
    """A small LightGBM on batch features of ``bars`` (label: the next bar closes higher),
    logged and registered as training_run.py does it (flavor, signature, recipe, tags)."""
    import lightgbm as lgb
    import pandas as pd

    rows = []
    for (symbol,), part in bars.partition_by("symbol", as_dict=True).items():
        feats = compute_features(part.sort("ts"), Timeframe.M5)
        up = (part.sort("ts")["close"].shift(-1) > part.sort("ts")["close"]).cast(pl.Int8)
        rows.append(feats.with_columns(label=up).tail(part.height - 250).head(part.height - 251))
    frame = pl.concat(rows)
    X = frame.select(pl.col(FEATURES).cast(pl.Float32)).to_numpy()
    y = frame["label"].to_numpy()
    model = lgb.LGBMClassifier(n_estimators=trees, num_leaves=7, learning_rate=0.1, min_child_samples=20, random_state=seed,
                               deterministic=True, force_col_wise=True, verbose=-1, n_jobs=1)
    model.fit(X, y, feature_name=list(FEATURES))
    registry = ModelRegistry(tracking_uri)
    run_id = registry.start_run("live-tests", f"{name}-{seed}")
    fs = feature_set or feature_set_version()
    registry.log_dict(run_id, {"family": "lightgbm", "task": "binary", "features": list(FEATURES), "feature_set": fs,
                               "classes": [0, 1], "seed": seed}, "recipe.json")
    example = pd.DataFrame(X[:5], columns=list(FEATURES))
    source = registry.log_model(run_id, "lightgbm", model, example, model.predict(example))
    version = registry.register(name, run_id, source, tags={"family": "lightgbm", "task": "binary", "feature_set": fs,
                                                           "classes": "[0, 1]", "timeframe": "M5"})
    registry.finish_run(run_id)
    if alias:
        registry.set_alias(name, alias, version)
    return version, model


def batch_predictions(model: Any, bars: pl.DataFrame, trade_from: datetime) -> pl.DataFrame:
    """The model's P(up) on the batch features of ``bars`` (one symbol), for bars from ``trade_from``."""
    feats = compute_features(bars.sort("ts"), Timeframe.M5).filter(pl.col("ts") >= trade_from)
    X = feats.select(pl.col(FEATURES).cast(pl.Float32)).to_numpy()
    return feats.select("symbol", "timeframe", "ts", "close_ts").with_columns(
        prob_up=pl.Series(model.predict_proba(X)[:, 1]), prediction=pl.lit(0.0))


class BusClient:
    """A private event loop in a thread, for tests that publish and read while a runner runs."""

    def __init__(self, url: str) -> None:
        self.bus = NatsBus(url, max_reconnect_attempts=-1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.bus.connect())
        self.run(self.bus.ensure_stream(BARS_STREAM))

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def publish_bar(self, bar: dict, subject: str | None = None, msg_id: str | None = None, payload: bytes | None = None) -> None:
        ts = bar["ts"] if isinstance(bar["ts"], int) else int(bar["ts"].timestamp() * 1000)
        sym, tf = bar["symbol"], bar["timeframe"]
        data = payload if payload is not None else encode_bar({**bar, "close_ts": bar.get("close_ts") or ts + BAR_MS})
        self.run(self.bus.js.publish(subject or f"bars.{sym}.{tf}", data, timeout=1.0,
                                     headers={"Nats-Msg-Id": msg_id or bar_msg_id(sym, tf, ts)}))

    def publish_bars(self, bars: pl.DataFrame) -> None:
        for bar in bars.sort("ts", "symbol").iter_rows(named=True):
            self.publish_bar(bar)

    def state(self, runner: str) -> dict | None:
        async def get():
            from nats.js.errors import BucketNotFoundError, KeyNotFoundError

            try:
                kv = await self.bus.js.key_value("tradeforge_live")
                entry = await kv.get(f"state.{runner}")
            except (KeyNotFoundError, BucketNotFoundError):
                return None
            return json.loads(entry.value)

        return self.run(get())

    def wait_state(self, runner: str, done: Callable[[dict], bool], timeout: float = 60.0,
                   alive: Callable[[], bool] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state(runner)
            if state is not None and done(state):
                return state
            if alive is not None and not alive():
                raise AssertionError(f"the runner died; last state: bars={state and state['bars']}")
            time.sleep(0.005)
        raise AssertionError(f"timed out; last state: bars={state and state['bars']}")

    def messages(self, stream: str, subject: str = ">") -> list[tuple[str, dict, str]]:
        """Every message of ``stream`` (on ``subject``): (subject, payload, Nats-Msg-Id)."""
        async def read():
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

            info = await self.bus.js.stream_info(stream)
            total = info.state.messages
            sub = await self.bus.js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=10.0))
            out = []
            while True:
                try:
                    batch = await sub.fetch(500, timeout=0.5)
                except Exception:  # noqa: BLE001
                    break
                out += [(m.subject, json.loads(m.data), (m.headers or {}).get("Nats-Msg-Id", "")) for m in batch]
                if len(out) >= total:
                    break
            await sub.unsubscribe()
            return out

        return self.run(read())

    def close(self) -> None:
        try:
            self.run(self.bus.close(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def history_start(n: int = WARMUP_BARS) -> datetime:
    return START


def replay_start(history_bars: int) -> datetime:
    return START + timedelta(milliseconds=BAR_MS * history_bars)


def days_of(frame: pl.DataFrame) -> list[date]:
    return sorted(set(frame["ts"].dt.date().to_list()))


__all__ = ["BAR_MS", "BusClient", "FEATURES", "START", "Path", "batch_predictions", "make_bars", "replay_start",
           "store_history", "train_and_register"]
