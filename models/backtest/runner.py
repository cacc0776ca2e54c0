"""The backtest: the trading engine driven over history, and what it leaves behind.

Bars (polars, one or more symbols of one timeframe) and either a rule-based strategy or a frame
of precomputed predictions (the columns of ``model_predictions``: symbol, timeframe, ts = bar
open, close_ts, fold, prediction, prob_up) go in; the same :class:`TradingEngine` the live
runner uses, with the :class:`SimulatedBroker`, turns them into orders, fills, trades, risk
events and equity per bar. One symbol runs as blocks of bars (the engine skips quiet bars);
several symbols run bar by bar in time order, so each decision sees every account mark.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from operator import attrgetter
from typing import Any

import numpy as np
import polars as pl

from models.backtest import metrics as M
from models.market.instruments import Instrument, instrument
from models.market.timeframes import Timeframe
from models.trading.currency import ConvMode, asof_rates, conversion_mode, cross_pair, mark_conversion
from models.trading.engine import BarBlock, EngineConfig, TradingEngine
from models.trading.fills import FillConfig, SimulatedBroker
from models.trading.risk import RiskConfig, RiskModel
from models.trading.strategy import ModelStrategy, Strategy

PREDICTION_COLUMNS = ("symbol", "timeframe", "ts", "close_ts", "fold", "prediction", "prob_up")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class BacktestConfig:
    initial_equity: float = 100_000.0
    account_currency: str = "USD"
    risk: RiskConfig = field(default_factory=RiskConfig)
    fill: FillConfig = field(default_factory=FillConfig)
    instruments: Mapping[str, Instrument] = field(default_factory=dict)  # overrides of the specs
    block_bars: int = 50_000  # bars per engine call (a progress step)


@dataclass
class BacktestResult:
    """A finished run. ``orders``, ``fills`` and ``risk_events`` are frames of the engine's
    records, built on first access (then kept): a sweep or an optimisation reads the metrics of
    thousands of runs and none of them, and on a run of thousands of trades they are most of
    what the backtest costs after the event loop. ``engine`` is the finished engine: drive it
    further and those frames (if not read yet) follow it."""

    strategy: str
    symbols: list[str]
    timeframe: str
    equity: pl.DataFrame  # ts, equity, drawdown, exposure, margin, buy_hold
    trades: pl.DataFrame
    metrics: dict[str, float]
    config: BacktestConfig
    engine: TradingEngine = field(repr=False)

    @cached_property
    def orders(self) -> pl.DataFrame:
        return orders_frame(self.engine)

    @cached_property
    def fills(self) -> pl.DataFrame:
        return fills_frame(self.engine)

    @cached_property
    def risk_events(self) -> pl.DataFrame:
        return risk_events_frame(self.engine)


def join_predictions(bars: pl.DataFrame, predictions: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Bars with each bar's prediction (``prediction``, ``prob_up``, ``fold``); a bar without
    one gets nulls and makes no decision. Refuses duplicated predictions and predictions whose
    close_ts is not their bar's close; counts predictions that match no bar."""
    missing = [c for c in ("symbol", "ts") if c not in predictions.columns]
    if missing or not {"prediction", "prob_up"} & set(predictions.columns):
        raise ValueError(f"predictions need symbol, ts and prediction or prob_up; got {predictions.columns}")
    keys = ["symbol", "ts"] + (["timeframe"] if "timeframe" in predictions.columns and "timeframe" in bars.columns else [])
    if all(_constant(predictions[c]) and _constant(bars[c]) and predictions[c][0] == bars[c][0] for c in keys if c != "ts"):
        keys = ["ts"]  # one symbol and timeframe on both sides: the bar's time is the key (a third of the time on 1M rows)
    dupes = predictions.height - predictions.select(keys).n_unique()
    if dupes:
        raise ValueError(f"{dupes} predictions repeat a (symbol, timeframe, ts): share a key with another")
    preds = predictions.with_columns(pl.col("ts").cast(bars["ts"].dtype))
    if "close_ts" in preds.columns and "timeframe" in bars.columns:
        tf = Timeframe(bars["timeframe"][0])
        if tf.minutes < 1440:  # fixed-length bars: a prediction is known at its bar's close
            late = preds.filter(pl.col("close_ts").cast(bars["ts"].dtype) != pl.col("ts") + pl.duration(minutes=tf.minutes)).height
            if late:
                raise ValueError(f"{late} predictions have a close_ts that is not their bar's close")
    take = [c for c in ("prediction", "prob_up", "fold") if c in preds.columns]
    joined = bars.join(preds.select(*keys, *take), on=keys, how="left")
    unmatched = preds.height - joined.select(pl.col(take[0]).is_not_null().sum()).item()
    return joined, {"predictions": preds.height, "unmatched_predictions": int(unmatched)}


def _constant(column: pl.Series) -> bool:
    return column.len() > 0 and column.null_count() == 0 and bool((column == column[0]).all())


def _conversion(spec: Instrument, account: str, bars: pl.DataFrame, rates: Mapping[str, pl.DataFrame] | None) -> np.ndarray:
    mode = conversion_mode(spec, account)
    close = bars["close"].to_numpy()
    if mode is not ConvMode.CROSS:
        return mark_conversion(mode, close)
    pair, invert = cross_pair(spec.quote_currency, account)
    if not rates or pair not in rates:
        raise ValueError(f"{spec.symbol} in a {account} account needs {pair} bars to convert its {spec.quote_currency} PnL")
    other = rates[pair].sort("ts")
    ms = bars["ts"].dt.epoch("ms").to_numpy()
    conv = asof_rates(ms, other["ts"].dt.epoch("ms").to_numpy(), other["close"].to_numpy(), invert)
    if np.isnan(conv).any():
        raise ValueError(f"{pair} has no bar at or before {spec.symbol}'s first bar: cannot convert its PnL")
    return conv


def run_backtest(bars: pl.DataFrame, strategy: Strategy, config: BacktestConfig = BacktestConfig(), *,
                 predictions: pl.DataFrame | None = None, rates: Mapping[str, pl.DataFrame] | None = None,
                 progress: Progress | None = None, name: str | None = None,
                 trade_from: datetime | None = None) -> BacktestResult:
    """Run ``strategy`` over ``bars`` (see the module doc). ``rates``: bars of the pairs that
    convert cross pairs' PnL (GBPUSD for EURGBP in a USD account). ``trade_from``: earlier bars
    only warm the strategy up (no decisions) and are left out of the results."""
    if bars.is_empty():
        raise ValueError("no bars to backtest")
    if predictions is not None:
        if not isinstance(strategy, ModelStrategy):
            raise ValueError("predictions drive the model strategy only")
        bars, _ = join_predictions(bars, predictions)
    if not (_constant(bars["symbol"]) and bars["ts"].null_count() == 0 and bars["ts"].is_sorted()):  # one symbol in time order: sorted
        bars = bars.sort("symbol", "ts")
    symbols = bars["symbol"].unique(maintain_order=True).to_list()
    specs = {s: config.instruments.get(s) or instrument(s) for s in symbols}
    spreads = {s: config.fill.spread if config.fill.spread is not None else specs[s].spread for s in symbols}
    engine_config = EngineConfig(name or strategy.name, config.initial_equity, config.account_currency)
    broker = SimulatedBroker(specs, config.fill, {s: conversion_mode(specs[s], config.account_currency) for s in symbols})
    engine = TradingEngine(engine_config, RiskModel(config.risk), broker, specs, spreads)
    blocks = {}
    for symbol in symbols:
        frame = bars.filter(pl.col("symbol") == symbol)
        signals = strategy.signals(frame)
        if trade_from is not None:
            signals = signals.with_columns(
                pl.when(frame["ts"] >= trade_from).then(pl.col("side")).otherwise(None).alias("side"))
        blocks[symbol] = BarBlock.build(frame, signals, spreads[symbol],
                                        _conversion(specs[symbol], config.account_currency, frame, rates),
                                        config.fill.use_bar_quotes)
    with cyclic_gc_paused():
        if len(symbols) == 1:
            symbol = symbols[0]
            block = blocks[symbol]
            n = len(block)
            equity, units = np.empty(n), np.empty(n)
            for start in range(0, n, config.block_bars):
                stop = min(start + config.block_bars, n)
                result = engine.run(symbol, block.slice(start, stop))
                equity[start:stop], units[start:stop] = result.equity, result.units
                if progress:
                    progress(stop, n)
            ts = block.ts
            exposure_value = np.abs(units) * block.close * block.conv
            margin = exposure_value / specs[symbol].leverage
            benchmark = block.close
        else:
            ts, equity, exposure_value, margin = _interleaved(engine, blocks, specs, progress)
            benchmark = None
    if trade_from is not None:
        keep = ts >= int(trade_from.timestamp() * 1000)
        ts, equity, exposure_value, margin = ts[keep], equity[keep], exposure_value[keep], margin[keep]
        benchmark = benchmark[keep] if benchmark is not None else None
        if not len(ts):
            raise ValueError(f"no bars from {trade_from}")
    in_market = exposure_value > 0
    result_equity = pl.DataFrame({
        "ts": pl.Series(ts).cast(pl.Datetime("ms", "UTC")),
        "equity": equity,
        "drawdown": M.drawdown(np.r_[config.initial_equity, equity])[1:],
        "exposure": exposure_value / equity,
        "margin": margin,
    })
    if benchmark is not None:
        result_equity = result_equity.with_columns(buy_hold=config.initial_equity * benchmark / benchmark[0])
    trades = trades_frame(engine)
    closed = trades.filter(pl.col("exit_ts").is_not_null())
    pf = engine.portfolio
    metrics = M.summarize(
        ts, equity, config.initial_equity, closed["pnl"].to_numpy(), closed["r_multiple"].fill_null(np.nan).to_numpy(),
        in_market, pf.traded_notional, pf.commission_total, pf.cost_total, benchmark,
    )
    metrics["open_trades"] = trades.height - closed.height
    metrics["orders"] = len(engine.orders)
    metrics["rejections"] = sum(1 for e in engine.risk_events if not e.approved)
    return BacktestResult(engine_config.strategy, symbols, str(bars["timeframe"][0]) if "timeframe" in bars.columns else "",
                          result_equity, trades, metrics, config, engine)


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the event loop: the engine's records (orders,
    fills, events, trades) form no reference cycles, so refcounting frees all its garbage, and the
    collector's passes over the growing record lists cost ~10% of a run of thousands of trades.
    The pause is process-wide (other threads' cycles wait too, for one run) and ends with it, as
    the collector was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _interleaved(engine: TradingEngine, blocks: dict[str, BarBlock], specs: Mapping[str, Instrument],
                 progress: Progress | None):
    """Bars of several symbols in time order, one engine step each; one row per timestamp
    (equity, gross notional and margin after its last bar)."""
    order = sorted((int(t), s, i) for s, b in blocks.items() for i, t in enumerate(b.ts))
    ts_out, eq_out, exp_out, margin_out = [], [], [], []
    values = {s: 0.0 for s in blocks}
    for k, (t, symbol, i) in enumerate(order):
        block = blocks[symbol]
        result = engine.run(symbol, block.slice(i, i + 1))
        values[symbol] = abs(float(result.units[0])) * float(block.close[i]) * float(block.conv[i])
        # the account's equity as the engine reports it (engine.equity(), what the live runner publishes): the
        # block's own figure sums the same marks in another order, a last-bit difference with several symbols
        row = (engine.equity(), sum(values.values()), sum(v / specs[s].leverage for s, v in values.items()))
        if ts_out and ts_out[-1] == t:
            eq_out[-1], exp_out[-1], margin_out[-1] = row
        else:
            ts_out.append(t)
            eq_out.append(row[0])
            exp_out.append(row[1])
            margin_out.append(row[2])
        if progress and (k + 1) % 10_000 == 0:
            progress(k + 1, len(order))
    if progress:
        progress(len(order), len(order))
    return np.array(ts_out, dtype=np.int64), np.array(eq_out), np.array(exp_out), np.array(margin_out)


def _ms(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Datetime("ms", "UTC"))


TRADE_SCHEMA = {"trade_id": pl.Int64, "symbol": pl.String, "side": pl.Int8, "qty": pl.Float64, "entry_ts": pl.Int64,
                "entry_price": pl.Float64, "exit_ts": pl.Int64, "exit_price": pl.Float64, "pnl": pl.Float64,
                "gross_pnl": pl.Float64, "commission": pl.Float64, "cost_spread": pl.Float64, "return_pct": pl.Float64,
                "r_multiple": pl.Float64, "initial_stop": pl.Float64, "risk": pl.Float64, "entry_equity": pl.Float64,
                "exit_reason": pl.String}


def _columns(records: list, names) -> dict[str, list]:
    """One list per attribute, each filled in one pass at C speed (``map`` of an ``attrgetter``:
    a third of a comprehension's time per value, on thousands of orders)."""
    return {name: list(map(attrgetter(name), records)) for name in names}


def trades_frame(engine: TradingEngine) -> pl.DataFrame:
    trades = engine.portfolio.trades
    columns = _columns(trades, [n for n in TRADE_SCHEMA if n != "exit_reason"])
    columns["exit_reason"] = [t.exit_reason or ("open" if t.is_open else "") for t in trades]
    return pl.DataFrame(columns, schema=TRADE_SCHEMA).with_columns(_ms("entry_ts"), _ms("exit_ts"))


def orders_frame(engine: TradingEngine) -> pl.DataFrame:
    schema = {"client_id": pl.String, "symbol": pl.String, "side": pl.Int8, "type": pl.String, "qty": pl.Float64,
              "intent": pl.String, "bar_ts": pl.Int64, "price": pl.Float64, "state": pl.String, "filled_qty": pl.Float64,
              "avg_fill_price": pl.Float64, "parent_id": pl.String, "reason": pl.String}
    orders = list(engine.orders.values())
    columns = _columns(orders, schema)  # the enums are int and str: polars reads their values
    return pl.DataFrame(columns, schema=schema).with_columns(_ms("bar_ts"))


def fills_frame(engine: TradingEngine) -> pl.DataFrame:
    schema = {"fill_id": pl.String, "client_id": pl.String, "symbol": pl.String, "side": pl.Int8, "qty": pl.Float64,
              "price": pl.Float64, "commission": pl.Float64, "ts": pl.Int64, "conv": pl.Float64, "mid": pl.Float64,
              "reason": pl.String}
    fills = engine.fills
    return pl.DataFrame(_columns(fills, schema), schema=schema).with_columns(_ms("ts"))


def risk_events_frame(engine: TradingEngine) -> pl.DataFrame:
    schema = {"ts": pl.Int64, "symbol": pl.String, "kind": pl.String, "approved": pl.Boolean, "reason": pl.String,
              "client_id": pl.String, "qty": pl.Float64}
    return pl.DataFrame(_columns(engine.risk_events, schema), schema=schema).with_columns(_ms("ts"))


def with_params(config: BacktestConfig, **risk: Any) -> BacktestConfig:
    """A copy of ``config`` with some risk settings changed (for sweeps)."""
    return replace(config, risk=replace(config.risk, **risk))
